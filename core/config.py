"""The service's settings: the library's (MODULORA_HOME and its folders) plus what the API, the
workers and the inference engine need. One object, read by `api/`, `worker/` and `core/`.

Environment variables carry the prefix MODULORA_ (e.g. MODULORA_JOB_QUEUE, MODULORA_INFERENCE_DEVICE).
The three service URLs also accept the conventional unprefixed names (DATABASE_URL, REDIS_URL,
BROKER_URL), so a docker-compose file or a PaaS can set them directly. Importing this module does not
import torch. Every field is listed in docs/service.md.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, field_validator

from modulora import training_defaults
from modulora.settings import HomeFolder, Settings

BASE_LEARNING_RATE = training_defaults.LEARNING_RATE
"""A job's learning rate is this times its `learning_rate_multiplier` (OpenAI's hyperparameter)."""


class ServiceSettings(Settings):
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
    base_models: dict[str, str] = {"smollm2-135m-instruct": "smollm2-135m-instruct"}
    """Base models listed by GET /v1/models and accepted by job creation: their names (the ids the
    API shows) and sources (a built-in name, a model folder, a .gguf file, or a Hugging Face id
    `org/name` already in the local Hugging Face cache). A JSON object, or a JSON list of sources
    named by themselves (built-ins) or by their folder's name."""
    sse_heartbeat_s: float = 15.0
    """Seconds between SSE heartbeat comments on an idle metrics stream."""
    max_upload_rows: int = 1_000_000
    """Uploads with more rows than this are refused with 400."""
    user_max_concurrent_requests: int = 16
    """Inference requests one user may have in flight at once (the engine's default batch: a client
    may fill it); more get 429 with Retry-After."""
    user_max_tokens_in_flight: int = 65536
    """`n` x `max_tokens` summed over one user's in-flight inference requests; more gets 429."""
    shutdown_grace_s: float = 5.0
    """On SIGTERM, open event streams get a final event and the server stops within this long."""

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

    # Inference engine (MODULORA_INFERENCE_*). To share a GPU with training, set the memory budget to
    # what the training workers leave free; to keep them apart, give the API
    # MODULORA_INFERENCE_DEVICE=cuda:1 and start workers with CUDA_VISIBLE_DEVICES=0.
    inference_device: str = "auto"
    """"auto" (CUDA when visible, else CPU), "cpu", "cuda" or "cuda:<index>"."""
    inference_dtype: str = "auto"
    """"auto" (bfloat16 on CUDA, float32 on CPU), "float32", "float16" or "bfloat16"."""
    inference_max_batch_size: int = 16
    """Sequences decoded together per base."""
    inference_max_seq_len: int = 2048
    """Prompt + completion tokens per sequence."""
    inference_memory_budget_bytes: int | None = Field(
        None,
        validation_alias=AliasChoices(
            "MODULORA_INFERENCE_MEMORY_BUDGET_BYTES", "MODULORA_INFERENCE_MEMORY_BYTES"
        ),
    )
    """The engine's share of its device: bases + KV caches + adapter banks + working memory. Each
    base's KV cache gets the rows (up to inference_max_batch_size) that fit beside its weights; a
    model that does not fit with one row is refused. Least-recently-used idle adapters, then bases,
    are evicted to stay under it. None: no limit (inference_max_batch_size rows)."""

    @field_validator("base_models", mode="before")
    @classmethod
    def _named_sources(cls, value: Any) -> Any:
        if isinstance(value, list):  # the older list form: a source's name is its last path part
            return {Path(str(source).removesuffix("/")).name or str(source): str(source) for source in value}
        return value

    @field_validator("base_models")
    @classmethod
    def _names_are_ids(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not name or name != name.strip() or name.startswith("ft:"):
                raise ValueError(
                    f"base model name {name!r} must be non-empty, unpadded and not start with 'ft:'"
                )
        return value

    @field_validator(
        "max_upload_bytes",
        "port",
        "max_upload_rows",
        "user_max_concurrent_requests",
        "user_max_tokens_in_flight",
    )
    @classmethod
    def _positive(cls, value: int) -> int:
        if value <= 0:
            raise ValueError(f"must be positive, got {value}")
        return value

    files_dir = HomeFolder("files")
    """Uploaded datasets, one file per File row, named by its id."""
    jobs_dir = HomeFolder("jobs")
    """Per-job work folders: `jobs/<id>/checkpoints/`."""
    adapters_dir = HomeFolder("adapters")
    """Exported adapters (PEFT files + manifest), one folder per job."""
    exports_dir = HomeFolder("exports")
    """Adapters exported for other stacks (`exports/<job id>/<format>`), made on first request."""

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
def get_settings() -> ServiceSettings:
    return ServiceSettings()
