"""The library's settings: where it keeps what it writes. Nothing here is about the service.

Environment variables carry the prefix MODULORA_ (MODULORA_HOME); a `.env` file in the working
directory is read too. The service extends these with its own (`core/config.py`), so MODULORA_HOME
means the same storage root to both. Importing this module does not import torch.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import overload

from pydantic_settings import BaseSettings, SettingsConfigDict


class HomeFolder:
    """A folder under the storage root, read like a property: `models_dir = HomeFolder("models")`."""

    def __init__(self, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, settings: None, owner: type) -> HomeFolder: ...
    @overload
    def __get__(self, settings: Settings, owner: type | None = None) -> Path: ...
    def __get__(self, settings: Settings | None, owner: type | None = None) -> Path | HomeFolder:
        return self if settings is None else settings.home / self.name


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MODULORA_", env_file=".env", extra="ignore", ignored_types=(HomeFolder,)
    )

    home: Path = Path.home() / ".cache" / "modulora"
    """Root of everything the project writes: model caches, quantized bases (and the service's jobs
    and uploads)."""

    models_dir = HomeFolder("models")
    """Converted built-in models (GGUF dequantized once into safetensors)."""
    bases_dir = HomeFolder("bases")
    """Quantized bases, shared across runs, keyed by model + quantization config."""


@functools.cache
def get_settings() -> Settings:
    return Settings()


def relative_to_home(path: str | os.PathLike[str]) -> str:
    """A path under the storage root, relative to it (hosts may mount the root elsewhere); any
    other reference (a model name, a path outside the root) as it is. Inverse: `from_home`."""
    absolute, home = Path(path), get_settings().home
    return (
        str(absolute.relative_to(home))
        if absolute.is_absolute() and absolute.is_relative_to(home)
        else str(path)
    )


def from_home(ref: str) -> str:
    """A reference as `relative_to_home` recorded it: a folder under the storage root as an absolute
    path, any other reference (a model name, `<model>:gguf`) as it is."""
    folder = get_settings().home / ref
    return str(folder) if ref and folder.is_dir() else ref
