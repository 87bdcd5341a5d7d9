"""A job's life in the database, torch-free: claim, lease, cancel flag, finish, recover.

A worker claims a job with one conditional UPDATE (atomic on SQLite and PostgreSQL), then renews a
lease from a heartbeat thread while it runs. A worker killed mid-job stops renewing; the next
worker start (and every worker's periodic sweep) re-enqueues jobs whose lease ran out, and the
claim accepts them, so the job resumes from its latest checkpoint. Redis may also redeliver the
unacked message later: the claim then finds the job finished or leased and does nothing.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select, update

from core.config import get_settings
from core.db.events import publish_status, record_event
from core.db.models import FINAL_STATUSES, Job, utcnow
from core.db.session import session_scope


def _lease_deadline() -> Any:
    return utcnow() + timedelta(seconds=get_settings().job_lease_s)


def claim(job_id: str, worker: str) -> bool:
    """Mark the job running for `worker`; False when it is finished, cancelled or leased elsewhere."""
    now = utcnow()
    with session_scope() as session:
        claimable = or_(
            Job.status == "queued",
            (Job.status == "running") & or_(Job.lease_expires_at < now, Job.worker == worker),
        )
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, claimable, Job.cancel_requested.is_(False))
            .values(
                status="running", worker=worker, lease_expires_at=_lease_deadline(), attempts=Job.attempts + 1
            )
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            return True
        job = session.scalar(select(Job).where(Job.id == job_id))
        if job is not None and job.cancel_requested and job.status not in FINAL_STATUSES:
            job.status, job.finished_at = "cancelled", now  # cancelled while waiting for a worker
            session.commit()
            record_event(session, job_id, "Job cancelled before it started")
            publish_status(job_id, "cancelled")
        return False


def finish(
    job_id: str, status: str, *, error: dict[str, Any] | None = None, message: str, **fields: Any
) -> None:
    """Put the job in a final state, with a closing event, and tell live streams."""
    assert status in FINAL_STATUSES, status
    with session_scope() as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        assert job is not None, job_id
        job.status, job.error, job.finished_at, job.lease_expires_at = status, error, utcnow(), None
        job.estimated_finish = None
        for name, value in fields.items():
            setattr(job, name, value)
        session.commit()
        record_event(session, job_id, message, level="error" if status == "failed" else "info")
    publish_status(job_id, status)


class Heartbeat(threading.Thread):
    """Renews the lease every lease/4 seconds and mirrors the job's cancel flag into `cancelled`."""

    def __init__(self, job_id: str, worker: str) -> None:
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.job_id, self.worker = job_id, worker
        self.cancelled = threading.Event()
        self._stop = threading.Event()

    def beat(self) -> None:
        with session_scope() as session:
            session.execute(
                update(Job)
                .where(Job.id == self.job_id, Job.worker == self.worker)
                .values(lease_expires_at=_lease_deadline())
            )
            if session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)):
                self.cancelled.set()

    def run(self) -> None:
        while not self._stop.wait(get_settings().job_lease_s / 4):
            self.beat()

    def stop(self) -> None:
        self._stop.set()


def requeue_stale_jobs() -> list[str]:
    """Put running jobs whose worker stopped renewing the lease back to `queued`; returns their ids.

    The caller sends each one to the queue again; back in `queued`, a job is not picked up by the
    next sweep, so a busy queue does not collect duplicate messages.
    """
    with session_scope() as session:
        stale = list(
            session.scalars(select(Job.id).where(Job.status == "running", Job.lease_expires_at < utcnow()))
        )
        for job_id in stale:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == "running")
                .values(status="queued", worker=None, lease_expires_at=None)
            )
            session.commit()
            record_event(
                session,
                job_id,
                "The worker running this job stopped; the job is queued again and "
                "resumes from its latest checkpoint",
                level="warn",
            )
        return stale
