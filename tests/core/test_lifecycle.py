"""core.lifecycle: atomic claim, lease expiry and re-queueing, cancel flag, final states."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from core import lifecycle
from core.db.models import Job, JobEvent, utcnow
from core.db.session import session_scope
from tests.api.conftest import CHAT_ROW, Service, jsonl


@pytest.fixture
def job_id(service: Service) -> str:
    alice = service.new_key("alice")
    file = service.upload(alice, jsonl([CHAT_ROW], copies=10))
    response = service.client.post(
        "/v1/fine_tuning/jobs",
        headers=alice,
        json={"model": "smollm2-135m-instruct", "training_file": file["id"]},
    )
    return str(response.json()["id"])


def job(job_id: str) -> Job:
    with session_scope() as session:
        row = session.scalar(select(Job).where(Job.id == job_id))
        assert row is not None
        return row


def messages(job_id: str) -> list[str]:
    with session_scope() as session:
        return list(
            session.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.pk))
        )


def test_claim_queued_job_once(job_id: str) -> None:
    assert lifecycle.claim(job_id, "w1") is True
    claimed = job(job_id)
    assert claimed.status == "running" and claimed.worker == "w1" and claimed.attempts == 1
    assert claimed.lease_expires_at is not None and claimed.lease_expires_at > utcnow()
    assert lifecycle.claim(job_id, "w2") is False  # leased by w1
    assert lifecycle.claim(job_id, "w1") is True  # w1's own redelivery (its pool child died) resumes


def test_expired_lease_requeues_job_for_another_worker(job_id: str) -> None:
    lifecycle.claim(job_id, "w1")
    with session_scope() as session:
        session.execute(
            Job.__table__.update()
            .where(Job.id == job_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    assert lifecycle.requeue_stale_jobs() == [job_id]
    assert job(job_id).status == "queued"
    assert lifecycle.requeue_stale_jobs() == []  # queued jobs are not re-sent by the next sweep
    assert lifecycle.claim(job_id, "w2") is True and job(job_id).attempts == 2
    assert any("queued again" in m for m in messages(job_id))


def test_claim_of_job_cancelled_while_queued_ends_it(job_id: str) -> None:
    with session_scope() as session:
        session.execute(Job.__table__.update().where(Job.id == job_id).values(cancel_requested=True))
    assert lifecycle.claim(job_id, "w1") is False
    assert job(job_id).status == "cancelled" and job(job_id).finished_at is not None


def test_heartbeat_renews_lease_and_sees_cancel(job_id: str) -> None:
    lifecycle.claim(job_id, "w1")
    before = job(job_id).lease_expires_at
    heartbeat = lifecycle.Heartbeat(job_id, "w1")
    with session_scope() as session:
        session.execute(Job.__table__.update().where(Job.id == job_id).values(cancel_requested=True))
    heartbeat.beat()
    assert heartbeat.cancelled.is_set()
    assert job(job_id).lease_expires_at >= before  # type: ignore[operator]


def test_finish_sets_final_state_error_and_event(job_id: str) -> None:
    lifecycle.claim(job_id, "w1")
    error = {"code": "training_error", "message": "boom", "param": None}
    lifecycle.finish(job_id, "failed", error=error, message="Job failed: boom")
    finished = job(job_id)
    assert finished.status == "failed" and finished.error == error and finished.lease_expires_at is None
    assert messages(job_id)[-1] == "Job failed: boom"
    assert lifecycle.claim(job_id, "w1") is False  # a late redelivery of a finished job does nothing
