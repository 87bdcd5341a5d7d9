"""Artifact storage under Settings.home: atomic writes, and paths that users never choose.

Every stored name is derived from a server-made id; a user's filename is kept only as metadata.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from api.errors import APIError
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


def zip_folder(folder: Path, name: str, compress: bool = True) -> FileResponse:
    """A folder under the storage root as a zip download named `<name>.zip` (a temporary file,
    removed once sent); 410 when its files are gone. `compress=False` stores weights as they are
    (they barely compress, and deflating gigabytes takes minutes)."""
    home = get_settings().home.resolve()
    folder = (folder if folder.is_absolute() else home / folder).resolve()
    if not folder.is_dir() or not folder.is_relative_to(home):
        raise APIError(410, f"The files of {name!r} are no longer on this server", code="artifact_missing")
    tmp = tempfile.NamedTemporaryFile(suffix=".zip", delete=False)
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, Path(name) / path.relative_to(folder))
    tmp.close()
    return FileResponse(
        tmp.name,
        media_type="application/zip",
        filename=f"{name}.zip",
        background=BackgroundTask(remove, Path(tmp.name)),
    )
