"""What a job is doing now: its phase (queued → quantizing → validating → training → evaluating →
exporting) with its progress where known.

The worker reports a phase as a job event (`type` "message", so OpenAI clients list it as a log
line) whose `data` is the phase object; the metrics stream forwards those events as `event: phase`
and the job object carries the latest one while the job runs. Its shape (docs/dashboard.md):

    {"phase": "quantizing", "done": 3, "total": 30, "unit": "layer", "eta_s": 41.5,
     "message": "Quantizing layer 3 of 30"}

`done`/`total` count `unit`s and may be null; `eta_s` is the phase's remaining time or null.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.events import record_event
from core.db.models import Job, JobEvent

PHASES = ("queued", "quantizing", "validating", "training", "evaluating", "exporting")
# How far back to look for a running job's latest phase: its newest message events (log lines
# without a phase are few between two phase reports).
_RECENT_MESSAGES = 50


def phase_data(
    phase: str,
    message: str,
    *,
    done: int | None = None,
    total: int | None = None,
    unit: str | None = None,
    eta_s: float | None = None,
) -> dict[str, Any]:
    """The phase object an event carries as its `data`."""
    if phase not in PHASES:
        raise ValueError(f"phase: {phase!r} is not one of {list(PHASES)}")
    return {"phase": phase, "done": done, "total": total, "unit": unit, "eta_s": eta_s, "message": message}


def is_phase(data: dict[str, Any] | None) -> bool:
    return bool(data) and data.get("phase") in PHASES  # type: ignore[union-attr]


def record_phase(session: Session, job_id: str, phase: str, message: str, **progress: Any) -> None:
    """Commit and publish a phase report (a log event with the phase object as its data)."""
    record_event(session, job_id, message, data=phase_data(phase, message, **progress))


def current_phase(session: Session, job: Job) -> dict[str, Any] | None:
    """The job's phase now: None once it has ended; for a waiting job its status says it; for a
    running one, the worker's latest report."""
    if job.status == "validating_files":
        return phase_data("validating", "Validating the files")
    if job.status == "queued":
        return phase_data("queued", "Queued: waiting for a worker")
    if job.status != "running":
        return None
    recent = session.scalars(
        select(JobEvent.data)
        .where(JobEvent.job_id == job.id, JobEvent.type == "message")
        .order_by(JobEvent.pk.desc())
        .limit(_RECENT_MESSAGES)
    )
    phase = next((data for data in recent if is_phase(data)), phase_data("queued", "Starting on a worker"))
    if phase["phase"] == "training":  # its progress is the latest step's
        step = session.scalar(
            select(JobEvent.data)
            .where(JobEvent.job_id == job.id, JobEvent.type == "metrics")
            .order_by(JobEvent.pk.desc())
            .limit(1)
        )
        if step:
            total = step.get("total_steps") or phase["total"]
            phase = {**phase, "done": step.get("step"), "total": total, "eta_s": step.get("eta_s")}
    return phase
