"""The API's side of serving: the process-wide engine (settings in `core.config`), `model` id resolution.

Imports no torch: `get_engine` imports the engine on first use, so the rest of the API starts and
tests without the ML stack.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from api import crud
from api.errors import APIError, not_found
from api.inference.types import EngineConfig, ModelSpec
from core.config import get_settings
from core.db.models import Checkpoint, Job, Model
from modulora.settings import from_home

if TYPE_CHECKING:
    from api.inference.engine import InferenceEngine


@functools.cache
def get_engine() -> InferenceEngine:
    from api.inference.engine import InferenceEngine

    settings = get_settings()
    return InferenceEngine(
        EngineConfig(
            settings.inference_device,
            settings.inference_dtype,
            settings.inference_max_batch_size,
            settings.inference_max_seq_len,
            settings.inference_memory_budget_bytes,
        )
    )


def resolve_model(*, session: Session, user_id: str, model_id: str) -> ModelSpec:
    """A base model name, one of the user's fine-tuned models or one of their jobs' checkpoints
    (another user's reads as missing)."""
    settings = get_settings()
    if model_id in settings.base_models:
        return ModelSpec(model_id, model_id)
    model = crud.visible_model(session=session, user_id=user_id, model_id=model_id)
    if model is not None:
        return ModelSpec(model.id, from_home(model.base), settings.home / model.path)
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
        return from_home(model.base)
    if job.hyperparameters.get("quantization") == "gguf":
        return f"{job.model}:gguf"
    # 400, not 409: the openai SDK retries a 409 on its own, and waiting a second will not help.
    raise APIError(
        400,
        f"Checkpoints of job {job.id} are servable once it finishes (its quantized base is not recorded yet)",
        param="model",
        code="checkpoint_not_ready",
    )
