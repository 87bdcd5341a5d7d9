"""The Celery app, configured from ServiceSettings. Run one worker per GPU:

    CUDA_VISIBLE_DEVICES=0 modulora worker -n gpu0@%h

Long GPU jobs: late acks (a lost worker's message is redelivered), prefetch 1, one task per child
process (a fresh child returns all GPU memory), and a DB lease that recovers crashed jobs long
before Redis' visibility timeout would.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutting_down
from kombu import Queue

from core import lifecycle
from core.config import get_settings
from core.tasks import TRAIN_TASK

settings = get_settings()
app = Celery("modulora", broker=settings.resolved_broker_url, include=["worker.tasks.train"])
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,  # a child killed mid-job puts its message back
    worker_prefetch_multiplier=1,
    worker_max_tasks_per_child=1,
    worker_concurrency=1,
    task_ignore_result=True,
    task_queues=[Queue(settings.job_queue)],
    task_default_queue=settings.job_queue,
    task_create_missing_queues=False,
    broker_transport_options=settings.broker_transport_options,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
_sweeper_stop = threading.Event()


def recover() -> list[str]:
    """Re-enqueue jobs whose worker died; every worker does this at start and every lease/2."""
    stale = lifecycle.requeue_stale_jobs()
    for job_id in stale:
        app.send_task(TRAIN_TASK, args=[job_id], queue=settings.job_queue)
    return stale


def _sweep() -> None:
    while not _sweeper_stop.wait(settings.job_lease_s / 2):
        recover()


@worker_ready.connect
def _on_worker_ready(**_: Any) -> None:
    recover()
    threading.Thread(target=_sweep, name="lease-sweeper", daemon=True).start()


@worker_shutting_down.connect
def _on_shutdown(**_: Any) -> None:
    _sweeper_stop.set()
