"""Database operations used by the routes and the CLI: keyword-only, session first.

Lists are newest first (OpenAI's order) and paged by an exclusive `after` cursor, the public id of
the last item of the previous page; an unknown cursor gives an empty page.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime
from typing import TypeVar

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from core.db.models import ApiKey, Checkpoint, File, Job, JobEvent, Model, User, utcnow

KEY_PREFIX = "mlk-"
Row = TypeVar("Row", File, Job, JobEvent, Checkpoint, Model)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# ----------------------------------------------------------------------------------- users, keys


def create_api_key(
    *,
    session: Session,
    user_name: str,
    name: str | None = None,
    expires_at: datetime | None = None,
    operator: bool | None = None,
) -> str:
    """Create the user if new and return a fresh key; only its hash is stored. `operator` sets
    (True/False) or keeps (None) the user's operator flag."""
    user = session.scalar(select(User).where(User.name == user_name))
    if user is None:
        user = User(name=user_name)
        session.add(user)
        session.flush()
    if operator is not None:
        user.is_operator = operator
    key = add_key(session=session, user_id=user.id, name=name, expires_at=expires_at)[0]
    session.commit()
    return key


def add_key(
    *, session: Session, user_id: str, name: str | None, expires_at: datetime | None
) -> tuple[str, ApiKey]:
    """A new key for an existing user (flushed, not committed): the secret, shown once, and its row."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(user_id=user_id, key_hash=hash_key(key), prefix=key[:10], name=name, expires_at=expires_at)
    session.add(row)
    session.flush()
    return key, row


def user_for_key(*, session: Session, key: str) -> User | None:
    """The key's user while the key is neither revoked nor expired (checked on every request, so a
    revocation takes effect at the next one)."""
    now = utcnow()
    return session.scalar(
        select(User)
        .join(ApiKey)
        .where(
            ApiKey.key_hash == hash_key(key),
            ApiKey.revoked_at.is_(None),
            (ApiKey.expires_at.is_(None)) | (ApiKey.expires_at > now),
        )
    )


def user_keys(*, session: Session, user_id: str) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).where(ApiKey.user_id == user_id).order_by(ApiKey.pk.desc())))


def get_key(*, session: Session, user_id: str, key_id: str) -> ApiKey | None:
    return session.scalar(select(ApiKey).where(ApiKey.public_id == key_id, ApiKey.user_id == user_id))


# ---------------------------------------------------------------------------------------- paging


def page(
    *, session: Session, stmt: Select[tuple[Row]], model: type[Row], after_pk: int | None, limit: int
) -> tuple[list[Row], bool]:
    """Rows of `stmt` newest first, strictly older than `after_pk`; (rows, has_more)."""
    if after_pk is not None:
        stmt = stmt.where(model.pk < after_pk)
    rows = list(session.scalars(stmt.order_by(model.pk.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def cursor_pk(
    *, session: Session, model: type[File | Job | Checkpoint | Model], after: str | None
) -> int | None:
    if after is None:
        return None
    pk = session.scalar(select(model.pk).where(model.id == after))
    return pk if pk is not None else 0  # unknown cursor: nothing is older than pk 0


# ----------------------------------------------------------------------------------------- files


def get_file(*, session: Session, user_id: str, file_id: str) -> File | None:
    return session.scalar(select(File).where(File.id == file_id, File.user_id == user_id))


# ------------------------------------------------------------------------------------------ jobs


def get_job(*, session: Session, user_id: str, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id, Job.user_id == user_id))


def job_by_idempotency_key(*, session: Session, user_id: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.user_id == user_id, Job.idempotency_key == key))


def event_cursor(after: str | None) -> int | None:
    if after is None:
        return None
    try:
        return int(after.removeprefix("ftevent-"))
    except ValueError:
        return 0


def events_after(*, session: Session, job_id: str, after_pk: int, type: str | None = None) -> list[JobEvent]:
    """Events newer than `after_pk`, oldest first (for the live stream)."""
    stmt = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.pk > after_pk)
    if type is not None:
        stmt = stmt.where(JobEvent.type == type)
    return list(session.scalars(stmt.order_by(JobEvent.pk)))


# ---------------------------------------------------------------------------------------- models


def visible_model(*, session: Session, user_id: str, model_id: str) -> Model | None:
    return session.scalar(select(Model).where(Model.id == model_id, Model.user_id == user_id))


def user_models(*, session: Session, user_id: str) -> list[Model]:
    return list(session.scalars(select(Model).where(Model.user_id == user_id).order_by(Model.pk)))


CHECKPOINT_NAME_MARK = ":ckpt-step-"


def checkpoint_name(job: Job, step: int) -> str:
    """A checkpoint's public model name (OpenAI's `fine_tuned_model_checkpoint`)."""
    return f"{job.fine_tuned_model_name()}{CHECKPOINT_NAME_MARK}{step}"


def visible_checkpoint(*, session: Session, user_id: str, model_id: str) -> tuple[Checkpoint, Job] | None:
    """One of the user's checkpoints by its id (`ftckpt-…`) or its public name
    (`ft:<base>:<suffix>:<job id>:ckpt-step-<N>`); another user's reads as missing."""
    stmt = select(Checkpoint, Job).join(Job, Job.id == Checkpoint.job_id).where(Job.user_id == user_id)
    name, mark, step = model_id.rpartition(CHECKPOINT_NAME_MARK)
    if mark and step.isdigit():
        job_id = name.rpartition(":")[2]
        stmt = stmt.where(Job.id == job_id, Checkpoint.step == int(step))
        found = session.execute(stmt).one_or_none()
        # The name must be the job's own (base and suffix too), not just end in its id.
        return (found[0], found[1]) if found and checkpoint_name(found[1], int(step)) == model_id else None
    found = session.execute(stmt.where(Checkpoint.id == model_id)).one_or_none()
    return (found[0], found[1]) if found else None
