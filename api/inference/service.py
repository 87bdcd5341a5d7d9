"""The API's side of serving: engine settings, the process-wide engine, and `model` id resolution.

Imports no torch: `get_engine` imports the engine on first use, so the rest of the API starts and
tests without the ML stack.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.orm import Session

from api import crud
from api.errors import not_found
from api.inference.types import EngineConfig, ModelSpec
from modulora.settings import get_settings

if TYPE_CHECKING:
    from api.inference.engine import InferenceEngine


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


@functools.cache
def get_engine() -> InferenceEngine:
    from api.inference.engine import InferenceEngine

    return InferenceEngine(InferenceSettings().engine_config())


def base_ref(base: str) -> str:
    """A `Model.base` as `load_model` takes it: folders under home are stored relative to it."""
    folder = get_settings().home / base
    return str(folder) if base and folder.is_dir() else base


def resolve_model(*, session: Session, user_id: str, model_id: str) -> ModelSpec:
    """A base model name or one of the user's fine-tuned models (another user's reads as missing)."""
    settings = get_settings()
    if model_id in settings.base_models:
        return ModelSpec(model_id, model_id)
    model = crud.visible_model(session=session, user_id=user_id, model_id=model_id)
    if model is not None:
        return ModelSpec(model.id, base_ref(model.base), settings.home / model.path)
    raise not_found("model", model_id, param="model")
