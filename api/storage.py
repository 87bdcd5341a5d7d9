"""Artifact storage under Settings.home: atomic writes, and paths that users never choose.

Every stored name is derived from a server-made id; a user's filename is kept only as metadata.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import zipfile
from pathlib import Path

from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from api.errors import APIError
from core.config import get_settings


def file_path(file_id: str) -> Path:
    return get_settings().files_dir / file_id


TEMP_MAX_AGE_S = 24 * 3600
"""A temporary file this old is left over whoever wrote it (an upload writes for minutes at most)."""


def temp_path(folder: Path, name: str) -> Path:
    """A temporary name for an upload in progress; it names its host and process, so a restarted
    API can tell its dead predecessors' leftovers from another replica's live uploads."""
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f".tmp-{socket.gethostname()}-{os.getpid()}-{name}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def sweep_temp_files(folder: Path) -> list[Path]:
    """Remove the temporary files of uploads that can no longer finish: written by a process of
    this host that is gone, or older than TEMP_MAX_AGE_S. Returns what was removed."""
    if not folder.is_dir():
        return []
    host, removed = socket.gethostname(), []
    for path in folder.glob(".tmp-*"):
        # .tmp-<host>-<pid>-<name>: the host may contain dashes, the pid and the name do not.
        writer_host, _, pid = path.name.removeprefix(".tmp-").rpartition("-")[0].rpartition("-")
        dead = writer_host == host and pid.isdigit() and not _alive(int(pid))
        try:
            stale = time.time() - path.stat().st_mtime > TEMP_MAX_AGE_S
        except FileNotFoundError:  # finished meanwhile
            continue
        if dead or stale:
            remove(path)
            removed.append(path)
    return removed


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
