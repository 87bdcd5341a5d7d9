"""/v1/files: upload (streamed, validated, nothing stored on a 4xx), list, retrieve, delete, content."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from sqlalchemy import select

from api import crud, storage
from api.deps import CurrentUser, SessionDep
from api.errors import APIError, bad_request, error_responses, not_found
from api.schemas import DeletedObject, FileObject, FileReport, ListPage
from api.upload import receive_upload
from core.bases import base_model_folder
from core.config import get_settings
from core.db.models import File, Job
from core.db.session import session_scope
from modulora.model_folder import ModelFolderError

router = APIRouter(prefix="/v1/files", tags=["files"])
PURPOSES = ("fine-tune",)
_UPLOAD_FORM = {
    "type": "object",
    "required": ["file", "purpose"],
    "properties": {
        "file": {"type": "string", "format": "binary"},
        "purpose": {"type": "string", "enum": list(PURPOSES)},
    },
}
_MULTIPART = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _UPLOAD_FORM}}}}


def to_public(file: File) -> FileObject:
    return FileObject(
        id=file.id,
        bytes=file.bytes,
        created_at=int(file.created_at.timestamp()),
        filename=file.filename,
        purpose=file.purpose,
        report=FileReport(**file.report),
    )


def _default_model_folder() -> Path | None:
    """The first base model's folder when this host can see it (its tokenizer counts tokens)."""
    try:
        return base_model_folder(next(iter(get_settings().base_models)))
    except (StopIteration, ModelFolderError):
        return None


def check_dataset(path: Any) -> dict[str, Any]:
    """`modulora.data.validate_file` with the default base model's tokenizer when it is cached."""
    from api.tokenizer import load_light_tokenizer
    from modulora import data  # torch-free, but only the upload route needs it

    settings = get_settings()
    folder = _default_model_folder()
    tokenizer = load_light_tokenizer(folder) if folder is not None else None
    report = data.validate_file(path, tokenizer=tokenizer)
    if not report.ok:
        first = report.errors[0] if report.errors else {"line": None, "field": None, "message": "no rows"}
        where = f"line {first['line']}" if first["line"] is not None else "file"
        field = f", field {first['field']!r}" if first["field"] else ""
        raise APIError(
            400,
            f"Invalid training file ({report.error_count} error(s)), first at {where}{field}: "
            f"{first['message']}",
            param="file",
            code="invalid_training_file",
            details={"line": first["line"], "field": first["field"], "errors": report.errors},
        )
    if report.rows > settings.max_upload_rows:
        raise bad_request(
            f"The file has {report.rows} rows; the limit is {settings.max_upload_rows}",
            param="file",
            code="too_many_rows",
        )
    warnings = (
        [f"{report.truncated} row(s) longer than {report.max_seq_len} tokens"] if report.truncated else []
    )
    stats = None if report.token_stats is None else {**report.token_stats, "histogram": report.histogram}
    return FileReport(
        format=report.format, rows=report.rows, token_stats=stats, warnings=warnings
    ).model_dump()


@router.post("", response_model=FileObject, openapi_extra=_MULTIPART)
async def upload_file(request: Request, user: CurrentUser) -> FileObject:
    """Upload a dataset (multipart `file`, `purpose=fine-tune`).

    Validating every row takes seconds for large files, so it runs in a worker thread, and the
    database is touched only for the final insert: other requests go on meanwhile.
    """
    settings = get_settings()
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > settings.max_upload_bytes + 64 * 1024:
        raise bad_request(
            f"The file is larger than the upload limit of {settings.max_upload_bytes} bytes",
            param="file",
            code="file_too_large",
        )
    tmp = storage.temp_path(settings.files_dir, uuid.uuid4().hex)
    try:
        upload = await receive_upload(
            request.headers.get("content-type", ""), request.stream(), tmp, settings.max_upload_bytes
        )
        purpose = upload.fields.get("purpose")
        if purpose not in PURPOSES:
            raise bad_request(f"purpose: {purpose!r} is not one of {list(PURPOSES)}", param="purpose")
        if upload.size == 0:
            raise bad_request(
                "The file is empty",
                param="file",
                code="invalid_training_file",
                details={"line": None, "field": None},
            )
        report = await anyio.to_thread.run_sync(check_dataset, tmp)
        file = File(
            user_id=user.id,
            filename=upload.filename[:255],
            purpose=purpose,
            bytes=upload.size,
            sha256=upload.sha256,
            format=report["format"],
            rows=report["rows"],
            report=report,
        )
        with session_scope() as session:
            session.add(file)
            session.flush()
            storage.commit_file(tmp, storage.file_path(file.id))
    finally:
        storage.remove(tmp)
    return to_public(file)


@router.get("", response_model=ListPage[FileObject])
def list_files(
    user: CurrentUser,
    session: SessionDep,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
) -> ListPage[FileObject]:
    """List your files, newest first."""
    stmt = select(File).where(File.user_id == user.id)
    if purpose is not None:
        stmt = stmt.where(File.purpose == purpose)
    after_pk = crud.cursor_pk(session=session, model=File, after=after)
    rows, has_more = crud.page(session=session, stmt=stmt, model=File, after_pk=after_pk, limit=limit)
    data = [to_public(f) for f in rows]
    return ListPage(
        data=data,
        has_more=has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


def _owned(session: SessionDep, user: CurrentUser, file_id: str) -> File:
    file = crud.get_file(session=session, user_id=user.id, file_id=file_id)
    if file is None:
        raise not_found("file", file_id, param="file_id")
    return file


@router.get("/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, user: CurrentUser, session: SessionDep) -> FileObject:
    """One of your files."""
    return to_public(_owned(session, user, file_id))


@router.delete("/{file_id}", response_model=DeletedObject, responses=error_responses(409))
def delete_file(file_id: str, user: CurrentUser, session: SessionDep) -> DeletedObject:
    """Delete a file no unfinished job is using."""
    file = _owned(session, user, file_id)
    busy = session.scalar(
        select(Job.id).where(
            (Job.training_file == file_id) | (Job.validation_file == file_id),
            Job.status.in_(("validating_files", "queued", "running")),
        )
    )
    if busy is not None:
        raise APIError(
            409,
            f"File {file_id!r} is used by the unfinished job {busy!r}",
            param="file_id",
            code="file_in_use",
        )
    session.delete(file)
    session.commit()
    storage.remove(storage.file_path(file_id))
    return DeletedObject(id=file_id, object="file")


@router.get("/{file_id}/content", response_class=FileResponse)
def file_content(file_id: str, user: CurrentUser, session: SessionDep) -> FileResponse:
    """The uploaded bytes."""
    file = _owned(session, user, file_id)
    return FileResponse(
        storage.file_path(file.id), media_type="application/octet-stream", filename=file.filename
    )
