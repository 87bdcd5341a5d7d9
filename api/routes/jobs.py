"""/v1/fine_tuning/jobs: create (idempotent), list, retrieve, cancel, delete, events, checkpoints."""

from __future__ import annotations

import hashlib
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api import crud, storage
from api.deps import CurrentUser, SessionDep
from api.errors import APIError, bad_request, error_responses, not_found
from api.schemas import CheckpointObject, DeletedObject, EventObject, JobCreate, JobObject, ListPage
from core import tasks
from core.bases import base_model_folder, base_model_source, check_base_model
from core.config import get_settings
from core.db.events import publish_status, record_event
from core.db.models import FINAL_STATUSES, Checkpoint, File, Job, JobEvent, Model, utcnow
from core.phases import current_phase, phase_data
from modulora import memory
from modulora.model_folder import ModelFolderError

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])
LimitQuery = Annotated[int, Query(ge=1, le=100)]


def _ts(value: Any) -> int | None:
    return int(value.timestamp()) if value is not None else None


def to_public(job: Job, session: Session) -> JobObject:
    return JobObject(
        id=job.id,
        created_at=int(job.created_at.timestamp()),
        finished_at=_ts(job.finished_at),
        model=job.model,
        fine_tuned_model=job.fine_tuned_model,
        organization_id=job.user_id,
        status=job.status,  # type: ignore[arg-type]
        hyperparameters=job.hyperparameters,
        training_file=job.training_file,
        validation_file=job.validation_file,
        trained_tokens=job.trained_tokens,
        seed=job.seed,
        estimated_finish=_ts(job.estimated_finish),
        error=job.error,
        metadata=job.metadata_,
        user_provided_suffix=job.suffix,
        method={"type": "supervised", "supervised": {"hyperparameters": job.hyperparameters}},
        estimated_memory_bytes=job.estimated_memory_bytes,
        validation_loss=job.validation_loss,
        integrations=job.integrations,
        result_files=job.result_files or [],
        phase=current_phase(session, job),
    )


def _file(session: SessionDep, user: CurrentUser, file_id: str, param: str) -> File:
    file = crud.get_file(session=session, user_id=user.id, file_id=file_id)
    if file is None:
        raise not_found("file", file_id, param=param)
    return file


def _check_calibration(session: SessionDep, user: CurrentUser, calibration: str) -> None:
    """ "default", "training_file", or one of the user's files (else 400: the job would fail later)."""
    if calibration in ("default", "training_file"):
        return
    if crud.get_file(session=session, user_id=user.id, file_id=calibration) is None:
        raise bad_request(
            f"hyperparameters.calibration: {calibration!r} is not 'default', 'training_file' or "
            "the id of one of your files",
            param="hyperparameters.calibration",
        )


def check_model(model: str, quantization: str) -> None:
    """400 naming `model` when its folder, as far as this host sees it, is not a usable model
    (not a model folder, a missing or unreadable shard, not a GGUF for `quantization="gguf"`). A
    source this host cannot see (a folder mounted only on the workers, a Hugging Face id not in
    this host's cache) is the worker's to check: the job then fails with the same message."""
    try:
        source = base_model_source(model)
    except ModelFolderError:
        return
    try:
        check_base_model(model, quantization)
    except ModelFolderError as e:
        raise bad_request(
            f"{e} (base model {model!r} maps to {source})", param="model", code="invalid_model"
        ) from None


def check_memory(model: str, hp: dict[str, Any]) -> int | None:
    """Estimated peak bytes (None when the base's config is not readable here yet); 400 if over the budget."""
    settings = get_settings()
    try:
        config = base_model_folder(model) / "config.json"
    except ModelFolderError:
        return None
    if not config.is_file():
        return None
    shape = memory.ModelShape.from_folder(config.parent)
    budget = settings.gpu_memory_budget_bytes
    estimate, hint = memory.check_job_memory(shape, hp, budget or None)
    if hint:
        raise APIError(
            400,
            f"The job needs ~{estimate.total / memory.GIB:.1f} GiB but the budget is "
            f"{budget / memory.GIB:.1f} GiB; {hint}",
            param="hyperparameters",
            code="insufficient_memory",
            details={"estimate": estimate.to_dict()},
        )
    return estimate.total


@router.post("", response_model=JobObject, responses=error_responses(404, 409))
def create_job(
    body: JobCreate,
    user: CurrentUser,
    session: SessionDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JobObject:
    """Create a fine-tuning job; a repeated Idempotency-Key returns the first job, or 409 when the
    body differs from the first one's."""
    body_sha256 = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    if idempotency_key:
        existing = crud.job_by_idempotency_key(session=session, user_id=user.id, key=idempotency_key)
        if existing is not None:
            return _replayed(existing, body_sha256, session)
    settings = get_settings()
    if body.model not in settings.base_models:
        raise bad_request(
            f"model: {body.model!r} is not one of {sorted(settings.base_models)}",
            param="model",
            code="model_not_available",
        )
    training = _file(session, user, body.training_file, "training_file")
    if body.validation_file is not None:
        _file(session, user, body.validation_file, "validation_file")
    try:
        hp = body.requested_hyperparameters().resolve(training.rows or 0)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(["hyperparameters", *(str(part) for part in first["loc"])])
        raise bad_request(f"{param}: {first['msg']}", param=param) from None
    except ValueError as e:
        raise bad_request(f"hyperparameters: {e}", param="hyperparameters") from None
    _check_calibration(session, user, hp["calibration"])
    check_model(body.model, hp["quantization"])
    estimate = check_memory(body.model, hp)
    job = Job(
        user_id=user.id,
        idempotency_key=idempotency_key,
        request_sha256=body_sha256,
        model=body.model,
        training_file=training.id,
        validation_file=body.validation_file,
        suffix=body.suffix,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
        metadata_=body.metadata,
        hyperparameters=hp,
        integrations=[i.model_dump(exclude_none=True) for i in body.integrations or []] or None,
        estimated_memory_bytes=estimate,
        status="validating_files",
    )
    session.add(job)
    try:
        session.commit()
    except IntegrityError:  # a concurrent retry with the same Idempotency-Key won the insert
        session.rollback()
        existing = crud.job_by_idempotency_key(session=session, user_id=user.id, key=idempotency_key or "")
        if existing is None:
            raise
        return _replayed(existing, body_sha256, session)
    # Files were validated at upload; the worker re-checks them with the base model's tokenizer.
    job.status = "queued"
    session.commit()
    record_event(
        session,
        job.id,
        f"Created fine-tuning job: {job.id}",
        data=phase_data("queued", "Queued: waiting for a worker"),
    )
    tasks.enqueue_training(job.id)
    return to_public(job, session)


def _replayed(job: Job, body_sha256: str, session: Session) -> JobObject:
    """The job an Idempotency-Key created, when this request repeats its body (a retry)."""
    if job.request_sha256 is not None and job.request_sha256 != body_sha256:
        raise APIError(
            409,
            "Idempotency-Key was already used with a different request body",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    return to_public(job, session)


def _metadata_filter(request: Request) -> dict[str, str]:
    return {
        k[len("metadata[") : -1]: v
        for k, v in request.query_params.items()
        if k.startswith("metadata[") and k.endswith("]")
    }


@router.get("", response_model=ListPage[JobObject])
def list_jobs(
    request: Request, user: CurrentUser, session: SessionDep, after: str | None = None, limit: LimitQuery = 20
) -> ListPage[JobObject]:
    """Your jobs, newest first; `metadata[key]=value` filters."""
    after_pk = crud.cursor_pk(session=session, model=Job, after=after)
    stmt = select(Job).where(Job.user_id == user.id)
    wanted = _metadata_filter(request)
    if not wanted:
        rows, has_more = crud.page(session=session, stmt=stmt, model=Job, after_pk=after_pk, limit=limit)
    else:  # JSON filtering differs across databases; job counts per user are small
        if after_pk is not None:
            stmt = stmt.where(Job.pk < after_pk)
        matching = [
            j
            for j in session.scalars(stmt.order_by(Job.pk.desc()))
            if all((j.metadata_ or {}).get(k) == v for k, v in wanted.items())
        ]
        rows, has_more = matching[:limit], len(matching) > limit
    return ListPage(data=[to_public(j, session) for j in rows], has_more=has_more)


def _owned(session: SessionDep, user: CurrentUser, job_id: str) -> Job:
    job = crud.get_job(session=session, user_id=user.id, job_id=job_id)
    if job is None:
        raise not_found("job", job_id, param="fine_tuning_job_id")
    return job


@router.get("/{job_id}", response_model=JobObject)
def retrieve_job(job_id: str, user: CurrentUser, session: SessionDep) -> JobObject:
    """One of your jobs."""
    return to_public(_owned(session, user, job_id), session)


@router.post("/{job_id}/cancel", response_model=JobObject)
def cancel_job(job_id: str, user: CurrentUser, session: SessionDep) -> JobObject:
    """Cancel: a waiting job ends at once, a running one within one training step."""
    job = _owned(session, user, job_id)
    if job.status in ("validating_files", "queued"):
        job.status, job.finished_at, job.cancel_requested = "cancelled", utcnow(), True
        session.commit()
        record_event(session, job.id, "Job cancelled before it started")
        publish_status(job.id, "cancelled")
    elif job.status == "running" and not job.cancel_requested:
        job.cancel_requested = True
        session.commit()
        record_event(session, job.id, "Cancellation requested; stopping after the current step")
    return to_public(job, session)


@router.delete("/{job_id}", response_model=DeletedObject, responses=error_responses(409))
def delete_job(job_id: str, user: CurrentUser, session: SessionDep) -> DeletedObject:
    """Delete a finished job with everything it made: events, checkpoints, its fine-tuned model and
    their files. A job still waiting or running must be cancelled first (409)."""
    job = _owned(session, user, job_id)
    if job.status not in FINAL_STATUSES:
        raise APIError(
            409,
            f"Job {job_id!r} is {job.status}: cancel it first (only a finished job can be deleted)",
            param="fine_tuning_job_id",
            code="job_not_finished",
        )
    settings = get_settings()
    folders = [settings.home / m.path for m in session.scalars(select(Model).where(Model.job_id == job.id))]
    folders += [settings.jobs_dir / job.id, settings.exports_dir / job.id]
    session.delete(job)  # events, checkpoints and models go with it (ON DELETE CASCADE)
    session.commit()
    for folder in folders:
        storage.remove(folder)
    return DeletedObject(id=job_id, object="fine_tuning.job")


def event_to_public(event: JobEvent) -> EventObject:
    return EventObject(
        id=event.public_id,
        created_at=int(event.created_at.timestamp()),
        level=event.level,  # type: ignore[arg-type]
        message=event.message,
        type=event.type,
        data=event.data,
    )  # type: ignore[arg-type]


@router.get("/{job_id}/events", response_model=ListPage[EventObject])
def list_events(
    job_id: str, user: CurrentUser, session: SessionDep, after: str | None = None, limit: LimitQuery = 20
) -> ListPage[EventObject]:
    """The job's events, newest first; `type: "metrics"` events carry step metrics."""
    job = _owned(session, user, job_id)
    stmt = select(JobEvent).where(JobEvent.job_id == job.id)
    rows, has_more = crud.page(
        session=session, stmt=stmt, model=JobEvent, after_pk=crud.event_cursor(after), limit=limit
    )
    return ListPage(data=[event_to_public(e) for e in rows], has_more=has_more)


@router.get("/{job_id}/checkpoints", response_model=ListPage[CheckpointObject])
def list_checkpoints(
    job_id: str, user: CurrentUser, session: SessionDep, after: str | None = None, limit: LimitQuery = 10
) -> ListPage[CheckpointObject]:
    """The job's saved checkpoints, newest first."""
    job = _owned(session, user, job_id)
    stmt = select(Checkpoint).where(Checkpoint.job_id == job.id)
    after_pk = crud.cursor_pk(session=session, model=Checkpoint, after=after)
    rows, has_more = crud.page(session=session, stmt=stmt, model=Checkpoint, after_pk=after_pk, limit=limit)
    data = [
        CheckpointObject(
            id=c.id,
            created_at=int(c.created_at.timestamp()),
            fine_tuning_job_id=job.id,
            step_number=c.step,
            fine_tuned_model_checkpoint=crud.checkpoint_name(job, c.step),
            metrics=c.metrics,
        )
        for c in rows
    ]
    return ListPage(data=data, has_more=has_more)
