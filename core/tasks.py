"""The Celery task names, defined once, and how the API sends work to them.

The API enqueues by name through a bare Celery client, so it never imports the worker's code; the
worker registers its task under the same name.
"""

from __future__ import annotations

import functools

from celery import Celery

from core.config import get_settings

TRAIN_TASK = "modulora.train"


@functools.cache
def _client(broker_url: str) -> Celery:
    client = Celery("modulora-api", broker=broker_url)
    client.conf.broker_transport_options = get_settings().broker_transport_options
    client.conf.broker_connection_retry_on_startup = True
    return client


def enqueue_training(job_id: str) -> None:
    settings = get_settings()
    _client(settings.resolved_broker_url).send_task(TRAIN_TASK, args=[job_id], queue=settings.job_queue)
