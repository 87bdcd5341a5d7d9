"""The one settings object, read by the library, the CLI, the worker and the API.

Environment variables carry the prefix MODULORA_ (e.g. MODULORA_HOME). The three service URLs also
accept the conventional unprefixed names (DATABASE_URL, REDIS_URL, BROKER_URL), so a docker-compose
file or a PaaS can set them directly. Importing this module does not import torch, so the API can
read settings without loading the ML stack. Every field is listed in docs/service.md.
"""

from __future__ import annotations

import functools
from pathlib import Path

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODULORA_", env_file=".env", extra="ignore")

    home: Path = Path.home() / ".cache" / "modulora"
    """Root of everything the project writes: model caches, quantized bases, jobs, uploads."""

    # Service URLs. Empty means "embedded": SQLite file, SQLite broker, in-process metrics.
    database_url: str = Field("", validation_alias=AliasChoices("MODULORA_DATABASE_URL", "DATABASE_URL"))
    """SQLAlchemy URL of the job database; default: SQLite file `<home>/modulora.db`."""
    redis_url: str = Field("", validation_alias=AliasChoices("MODULORA_REDIS_URL", "REDIS_URL"))
    """Redis for the broker (unless broker_url is set) and for live metrics pub/sub."""
    broker_url: str = Field("", validation_alias=AliasChoices("MODULORA_BROKER_URL", "BROKER_URL"))
    """Celery broker; default: redis_url if set, else the SQLite broker `<home>/broker.db`."""

    # API
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_bytes: int = 100 * 1024 * 1024
    """Uploads larger than this are refused with 400 (nothing is stored)."""
    base_models: list[str] = ["smollm2-135m-instruct"]
    """Base models listed by GET /v1/models and accepted by job creation."""
    sse_heartbeat_s: float = 15.0
    """Seconds between SSE heartbeat comments on an idle metrics stream."""

    # Worker
    job_queue: str = "gpu"
    """Celery queue the training task is sent to; run one worker per GPU on it."""
    job_lease_s: float = 60.0
    """A running job whose worker has not renewed its lease for this long is recovered."""
    visibility_timeout_s: int = 7 * 24 * 3600
    """Redis redelivers an unacked message after this long: above the longest job (the lease
    recovers crashed jobs much sooner)."""
    gpu_memory_budget_bytes: int = 0
    """Memory a job may use on its device; 0 means the device's total memory (CPU: unchecked)."""

    @field_validator("max_upload_bytes", "port")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value <= 0:
            raise ValueError(f"must be positive, got {value}")
        return value

    @property
    def models_dir(self) -> Path:
        """Converted built-in models (GGUF dequantized once into safetensors)."""
        return self.home / "models"

    @property
    def bases_dir(self) -> Path:
        """Quantized bases, shared across jobs, keyed by model + quantization config."""
        return self.home / "bases"

    @property
    def files_dir(self) -> Path:
        """Uploaded datasets, one file per File row, named by its id."""
        return self.home / "files"

    @property
    def jobs_dir(self) -> Path:
        """Per-job work folders: `jobs/<id>/checkpoints/`."""
        return self.home / "jobs"

    @property
    def adapters_dir(self) -> Path:
        """Exported adapters (PEFT files + manifest), one folder per job."""
        return self.home / "adapters"

    @property
    def resolved_database_url(self) -> str:
        url = self.database_url or f"sqlite:///{self.home / 'modulora.db'}"
        # Plain postgres URLs (as docker images and PaaS hand them out) mean psycopg 3 here.
        for scheme in ("postgres://", "postgresql://"):
            if url.startswith(scheme):
                return "postgresql+psycopg://" + url[len(scheme) :]
        return url

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or self.redis_url or f"sqla+sqlite:///{self.home / 'broker.db'}"

    @property
    def broker_transport_options(self) -> dict[str, object]:
        """Celery transport options, the same for the API's client and the workers."""
        if self.resolved_broker_url.startswith(("redis://", "rediss://")):
            return {"visibility_timeout": self.visibility_timeout_s}
        return {}  # the SQLAlchemy transport hands its options to create_engine, which takes none of these


@functools.cache
def get_settings() -> Settings:
    return Settings()
