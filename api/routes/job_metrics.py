"""GET /v1/fine_tuning/jobs/{id}/metrics/stream: live step metrics and phases as server-sent events.

Each step is an `event: metrics`, each phase report of the worker (`core.phases`) an `event: phase`;
both have `id:` = the event row's number, so a reconnect with `Last-Event-ID` replays exactly what
was missed. The database is the record: a Redis message (or, without Redis,
a short poll) only says "look again". Idle streams get a heartbeat comment; the end of the job
sends `event: done` with its final status and closes the stream; a server that is stopping sends
`event: stopping` and closes it (the client reconnects with Last-Event-ID to another replica or
the restarted server).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from api import crud, stopping
from api.deps import CurrentUser
from api.errors import not_found
from core.config import get_settings
from core.db.events import job_channel
from core.db.models import FINAL_STATUSES, Job, JobEvent
from core.db.session import session_scope
from core.phases import is_phase

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])
POLL_S = 0.5


def _read(job_id: str, after_pk: int) -> tuple[list[JobEvent], str]:
    """The job's metrics and phase events after `after_pk`, oldest first, and its status."""
    with session_scope() as session:
        events = crud.events_after(session=session, job_id=job_id, after_pk=after_pk)
        status = session.scalar(select(Job.status).where(Job.id == job_id))
        return [e for e in events if e.type == "metrics" or is_phase(e.data)], str(status)


def format_sse(data: dict[str, Any], *, event: str, id: int | None = None) -> str:
    head = f"id: {id}\n" if id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _wake_up(pubsub: Any, timeout: float) -> None:
    """Return when the job's channel says something, or after `timeout` seconds."""
    if pubsub is None:
        await asyncio.sleep(min(timeout, POLL_S))
        return
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if await pubsub.get_message(ignore_subscribe_messages=True, timeout=min(left, 1.0)) is not None:
            return


async def metric_events(job_id: str, after_pk: int, request: Request) -> AsyncIterator[str]:
    settings = get_settings()
    pubsub, client = None, None
    if settings.redis_url:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(settings.redis_url)
        pubsub = client.pubsub()
        await pubsub.subscribe(job_channel(job_id))  # before the first read: nothing slips between
    yield "retry: 3000\n\n"
    last_sent = time.monotonic()
    try:
        while True:
            events, status = await anyio.to_thread.run_sync(_read, job_id, after_pk)
            for event in events:
                after_pk = event.pk
                yield format_sse(
                    {**(event.data or {}), "created_at": int(event.created_at.timestamp())},
                    event="metrics" if event.type == "metrics" else "phase",
                    id=event.pk,
                )
                last_sent = time.monotonic()
            if status in FINAL_STATUSES:
                yield format_sse({"status": status}, event="done")
                return
            if await request.is_disconnected():
                return
            if stopping.is_stopping():
                yield format_sse({"reason": "server_stopping"}, event="stopping")
                return
            if time.monotonic() - last_sent >= settings.sse_heartbeat_s:
                yield ": heartbeat\n\n"
                last_sent = time.monotonic()
            await _wake_up(pubsub, settings.sse_heartbeat_s - (time.monotonic() - last_sent))
    finally:
        if pubsub is not None and client is not None:
            await pubsub.aclose()
            await client.aclose()


@router.get(
    "/{job_id}/metrics/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
def stream_metrics(
    job_id: str,
    request: Request,
    user: CurrentUser,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Server-sent step metrics and phases; reconnect with Last-Event-ID to replay what was missed.

    The stream holds no database connection: each read opens a short session (`_read`)."""
    with session_scope() as session:
        job = crud.get_job(session=session, user_id=user.id, job_id=job_id)
    if job is None:
        raise not_found("job", job_id, param="fine_tuning_job_id")
    after_pk = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0
    return StreamingResponse(
        metric_events(job.id, after_pk, request),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
