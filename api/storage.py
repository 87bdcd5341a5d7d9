"""Artifact storage under Settings.home: atomic writes, and paths that users never choose.

Every stored name is derived from a server-made id; a user's filename is kept only as metadata.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from core.config import get_settings


def file_path(file_id: str) -> Path:
    return get_settings().files_dir / file_id


def temp_path(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f".tmp-{name}-{os.getpid()}"


def commit_file(tmp: Path, final: Path) -> None:
    """Rename a finished temporary file into place (atomic on one filesystem)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
