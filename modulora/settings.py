"""The one settings object, read by the library, the CLI, the worker and the API.

Environment variables carry the prefix MODULORA_ (e.g. MODULORA_HOME). Importing this module does
not import torch, so the API can read settings without loading the ML stack.
"""

from __future__ import annotations

import functools
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODULORA_", env_file=".env", extra="ignore")

    home: Path = Path.home() / ".cache" / "modulora"
    """Root of everything the project writes: model caches, quantized bases, jobs, uploads."""

    @property
    def models_dir(self) -> Path:
        """Converted built-in models (GGUF dequantized once into safetensors)."""
        return self.home / "models"

    @property
    def bases_dir(self) -> Path:
        """Quantized bases, shared across jobs, keyed by model + quantization config."""
        return self.home / "bases"


@functools.cache
def get_settings() -> Settings:
    return Settings()
