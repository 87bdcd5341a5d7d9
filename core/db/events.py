"""Job events: one row per message or training step, mirrored on the job's Redis channel.

The database is the record (paged by GET .../events, replayed by the SSE stream after a
reconnect); Redis pub/sub only wakes up live streams. Without Redis the stream polls the table.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.config import get_settings
from core.db.models import JobEvent


def job_channel(job_id: str) -> str:
    return f"modulora:jobs:{job_id}"


@functools.cache
def _redis(url: str) -> Any:
    import redis  # the embedded default runs without Redis

    return redis.Redis.from_url(url)


def publish(job_id: str, payload: dict[str, Any]) -> None:
    """Best effort: a live stream that misses a message catches up from the database."""
    url = get_settings().redis_url
    if not url:
        return
    import redis

    try:
        _redis(url).publish(job_channel(job_id), json.dumps(payload))
    except redis.RedisError:
        pass  # Redis down: the events are in the database; streams poll it on every heartbeat


def record_event(
    session: Session,
    job_id: str,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    step: int | None = None,
    data: dict[str, Any] | None = None,
) -> JobEvent | None:
    """Commit one event and publish it; a metrics step already recorded is skipped (None)."""
    if step is not None:
        exists = session.scalar(select(JobEvent.pk).where(JobEvent.job_id == job_id, JobEvent.step == step))
        if exists is not None:
            return None
    event = JobEvent(job_id=job_id, message=message, level=level, type=type, step=step, data=data)
    session.add(event)
    session.commit()
    publish(job_id, {"kind": "event", "id": event.pk, "type": type, "data": data})
    return event


def publish_status(job_id: str, status: str) -> None:
    publish(job_id, {"kind": "status", "status": status})
