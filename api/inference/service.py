"""Where the API's inference routes get their engine and what a `model` id serves.

Imports no torch: `get_inference_engine` imports the engine on first use, so the rest of the API
starts and tests without the ML stack.
"""

from __future__ import annotations

import functools
import threading

from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import select
from sqlalchemy.orm import Session

from api import crud
from api.db.models import Checkpoint, Job, Model
from api.errors import APIError, not_found
from modulora.serve.protocol import EngineClient
from modulora.serve.types import EngineConfig, ModelSpec
from modulora.settings import get_settings


class InferenceSettings(BaseSettings):
    """MODULORA_INFERENCE_*: where and how big the engine is (see `EngineConfig`).

    To share a GPU with training, set MEMORY_BUDGET_BYTES to what the training workers leave free;
    to keep them apart, give the API DEVICE=cuda:1 and start workers with CUDA_VISIBLE_DEVICES=0.
    """

    model_config = SettingsConfigDict(env_prefix="MODULORA_INFERENCE_", env_file=".env", extra="ignore")
    device: str = "auto"
    dtype: str = "auto"
    max_batch_size: int = 16
    max_seq_len: int = 2048
    memory_budget_bytes: int | None = None

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            self.device, self.dtype, self.max_batch_size, self.max_seq_len, self.memory_budget_bytes
        )


_engine_lock = threading.Lock()


@functools.cache
def _create_engine() -> EngineClient:
    from modulora.serve.engine import InferenceEngine

    return InferenceEngine(InferenceSettings().engine_config())


def get_inference_engine() -> EngineClient:
    """The process's one engine. `functools.cache` alone does not serialise first calls: concurrent
    first requests each built an engine, and their loads raced (issues 22 and 23)."""
    with _engine_lock:
        return _create_engine()


def base_ref(base: str) -> str:
    """A `Model.base` as `load_model` takes it: folders under home are stored relative to it."""
    folder = get_settings().home / base
    return str(folder) if base and folder.is_dir() else base


def model_spec_for(*, session: Session, user_id: str, model_id: str) -> ModelSpec:
    """A base model name, one of the user's fine-tuned models or one of their jobs' checkpoints
    (another user's reads as missing)."""
    settings = get_settings()
    if model_id in settings.base_models:
        return ModelSpec(model_id, model_id)
    model = crud.visible_model(session=session, user_id=user_id, model_id=model_id)
    if model is not None:
        return ModelSpec(model.id, base_ref(model.base), settings.home / model.path)
    found = session.execute(
        select(Checkpoint, Job)
        .join(Job, Job.id == Checkpoint.job_id)
        .where(Checkpoint.id == model_id, Job.user_id == user_id)
    ).one_or_none()
    if found is None:
        raise not_found("model", model_id, param="model")
    checkpoint, job = found
    hp = job.hyperparameters
    scaling = hp["lora_alpha"] / hp["lora_r"]  # what the worker's LoraConfig gives (no rsLoRA)
    return ModelSpec(checkpoint.id, checkpoint_base(session, job), settings.home / checkpoint.path, scaling)


def checkpoint_base(session: Session, job: Job) -> str:
    """The base a job trains on: its fine-tuned model's record once it has one; before that, only
    a GGUF-native base (`<model>:gguf`) is known without the worker's quantized-base cache key."""
    model = session.scalar(select(Model).where(Model.job_id == job.id))
    if model is not None:
        return base_ref(model.base)
    if job.hyperparameters.get("quantization") == "gguf":
        return f"{job.model}:gguf"
    # 400, not 409: the openai SDK retries a 409 on its own, and waiting a second will not help.
    raise APIError(
        400,
        f"Checkpoints of job {job.id} are servable once it finishes (its quantized base is not recorded yet)",
        param="model",
        code="checkpoint_not_ready",
    )
