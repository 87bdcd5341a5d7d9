"""SQLAlchemy 2 tables: users and their API keys, files, jobs, events, checkpoints, models.

No FastAPI here: the worker imports these tables too. Every row the API lists has an integer `pk`
(insertion order, the paging cursor) and a public string `id` (`file-…`, `ftjob-…`, ...).
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

JOB_STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATUSES = ("succeeded", "failed", "cancelled")


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on both backends (SQLite hands back naive datetimes otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UTCDateTime}


class User(Base):
    __tablename__ = "users"
    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, default=lambda: new_id("user"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    is_operator: Mapped[bool] = mapped_column(Boolean, default=False)
    """Operators may read `/metrics`, which counts every user's jobs."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"
    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    """SHA-256 of the key: keys are random 256-bit tokens, so a slow hash adds nothing."""
    prefix: Mapped[str] = mapped_column(String(16))
    """The key's first characters, shown in key lists so users can tell their keys apart."""
    public_id: Mapped[str] = mapped_column(String(40), unique=True, default=lambda: new_id("key"))
    name: Mapped[str | None] = mapped_column(String(100))
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class File(Base):
    __tablename__ = "files"
    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, default=lambda: new_id("file"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(40))
    bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    format: Mapped[str | None] = mapped_column(String(40))
    rows: Mapped[int | None] = mapped_column(Integer)
    report: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("user_id", "idempotency_key"),)
    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, default=lambda: new_id("ftjob"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_sha256: Mapped[str | None] = mapped_column(String(64))
    """The creating request's body, so a reused Idempotency-Key with another body is a 409."""
    model: Mapped[str] = mapped_column(String(255))
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40))
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(Integer)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """Resolved: n_epochs, batch_size, learning_rate_multiplier, plus our extras (quantization,
    LoRA, sequence length), everything the worker needs; "auto" never reaches this column."""
    status: Mapped[str] = mapped_column(String(20), default="validating_files", index=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(255))
    trained_tokens: Mapped[int | None] = mapped_column(Integer)
    estimated_finish: Mapped[datetime | None]
    estimated_memory_bytes: Mapped[int | None] = mapped_column(Integer)
    validation_loss: Mapped[float | None] = mapped_column(Float)
    integrations: Mapped[list[Any] | None] = mapped_column(JSON)
    """OpenAI's `integrations` as given (Weights & Biases); TensorBoard needs none, it is always on."""
    result_files: Mapped[list[Any] | None] = mapped_column(JSON)
    """Ids of the `File` rows the job produced (its step-metrics CSV), set when it succeeds."""
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    """How many times a worker has started this job (redeliveries and recoveries included)."""
    worker: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None]
    """Renewed by the running worker; past it, a worker start re-enqueues the job."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]

    def fine_tuned_model_name(self) -> str:
        """OpenAI's shape, `ft:<base>:<suffix>:<job id>`; the job id keeps it unique."""
        return f"ft:{self.model}:{self.suffix or ''}:{self.id}"


class JobEvent(Base):
    __tablename__ = "events"
    # Metrics events carry their step: a redelivered job cannot write one step twice. Message
    # events have step NULL, which unique constraints ignore on SQLite and PostgreSQL alike.
    __table_args__ = (UniqueConstraint("job_id", "step"),)
    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    level: Mapped[str] = mapped_column(String(10), default="info")
    type: Mapped[str] = mapped_column(String(10), default="message")
    message: Mapped[str] = mapped_column(Text)
    step: Mapped[int | None] = mapped_column(Integer)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    @property
    def public_id(self) -> str:
        return f"ftevent-{self.pk}"


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step"),)
    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, default=lambda: new_id("ftckpt"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Model(Base):
    """A finished adapter; its `id` is the job's `fine_tuned_model` name."""

    __tablename__ = "models"
    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(255), unique=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    parent: Mapped[str] = mapped_column(String(255))
    base: Mapped[str] = mapped_column(Text)
    """The exact base the adapter was trained on: `<model>:gguf` or a quantized folder under bases/."""
    path: Mapped[str] = mapped_column(Text)
    """Adapter folder relative to Settings.home (never a path a user chose)."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
