"""Where the API's inference routes get their engine and what a `model` id serves.

Imports no torch: `get_inference_engine` imports the engine on first use, so the rest of the API
starts and tests without the ML stack.
"""

from __future__ import annotations

import functools
import threading

from sqlalchemy import select
from sqlalchemy.orm import Session

from api import crud
from api.errors import bad_request, not_found
from core.bases import base_model_source, job_base
from core.config import get_settings
from core.db.models import Job, Model
from modulora.model_folder import ModelFolderError
from modulora.serve.protocol import EngineClient
from modulora.serve.types import EngineConfig, ModelSpec
from modulora.settings import from_home

_engine_lock = threading.Lock()


@functools.cache
def _create_engine() -> EngineClient:
    from modulora.serve.engine import InferenceEngine

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


def get_inference_engine() -> EngineClient:
    """The process's one engine. `functools.cache` alone does not serialise first calls: concurrent
    first requests each built an engine, and their loads raced (issues 22 and 23)."""
    with _engine_lock:
        return _create_engine()


def model_spec_for(*, session: Session, user_id: str, model_id: str) -> ModelSpec:
    """A base model name, one of the user's fine-tuned models or one of their jobs' checkpoints (by
    id or public `…:ckpt-step-N` name); another user's reads as missing."""
    settings = get_settings()
    if model_id in settings.base_models:
        return ModelSpec(model_id, _source(model_id))
    model = crud.visible_model(session=session, user_id=user_id, model_id=model_id)
    if model is not None:
        return ModelSpec(model.id, from_home(model.base), settings.home / model.path)
    found = crud.visible_checkpoint(session=session, user_id=user_id, model_id=model_id)
    if found is None:
        raise not_found("model", model_id, param="model")
    checkpoint, job = found
    hp = job.hyperparameters
    scaling = hp["lora_alpha"] / hp["lora_r"]  # what the worker's LoraConfig gives (no rsLoRA)
    return ModelSpec(checkpoint.id, checkpoint_base(session, job), settings.home / checkpoint.path, scaling)


def checkpoint_base(session: Session, job: Job) -> str:
    """The base a job trains on: its fine-tuned model's record once it has one; before that (a
    running, cancelled or failed job) the folder the worker builds, named by `core.bases.job_base`."""
    model = session.scalar(select(Model).where(Model.job_id == job.id))
    if model is not None:
        return from_home(model.base)
    try:
        return job_base(job.model, job.hyperparameters, job.training_file)
    except ModelFolderError as e:
        raise bad_request(str(e), param="model", code="invalid_model") from None


def _source(name: str) -> str:
    """The library reference of a base model name; 400 naming `model` when its source is gone."""
    try:
        return base_model_source(name)
    except ModelFolderError as e:
        raise bad_request(str(e), param="model", code="invalid_model") from None
