"""/v1/dashboard: JSON the browser dashboard needs beyond the OpenAI contract.

Form options and the peak-memory estimate for the new-job page, a dataset's report for a chosen
sequence length and a preview of rows as the model sees them (trained tokens marked), live
progress of every job, the user's checkpoints, and zip downloads of adapters and checkpoints.
Everything here is torch-free: tokenization goes through `api.tokenizer.LightTokenizer`.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
import zipfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse
from pydantic import BaseModel, ValidationError
from sqlalchemy import func, select
from starlette.background import BackgroundTask

from api import crud, storage
from api.deps import CurrentUser, SessionDep
from api.errors import APIError, bad_request, not_found
from api.schemas import METHOD_BITS, QUANT_METHODS, JobCreate
from api.tokenizer import LightTokenizer, load_light_tokenizer
from core.config import get_settings
from core.db.models import Checkpoint, File, Job, JobEvent
from modulora import data, memory

router = APIRouter(prefix="/v1/dashboard", tags=["dashboard"])

GB = 10**9
# Cards people pick from; memory as vendors state it (decimal GB).
GPUS = [
    {"name": "16GB", "label": "16 GB card (T4, V100 16 GB)", "memory_bytes": 16 * GB},
    {"name": "24GB", "label": "24 GB card (RTX 3090/4090, A10)", "memory_bytes": 24 * GB},
    {"name": "40GB", "label": "A100 40 GB", "memory_bytes": 40 * GB},
    {"name": "48GB", "label": "48 GB card (A6000, L40S)", "memory_bytes": 48 * GB},
    {"name": "80GB", "label": "80 GB card (A100, H100)", "memory_bytes": 80 * GB},
    {"name": "141GB", "label": "H200 141 GB", "memory_bytes": 141 * GB},
]
# Bit widths each method produces (GGUF: the Q4_0/Q4_1/Q8_0 block formats).
METHOD_LABELS = {
    "rtn": "RTN (round to nearest, no calibration)",
    "optq": "OPTQ / GPTQ (calibrated)",
    "nf4": "NF4 (QLoRA's 4-bit normal float)",
    "gguf": "GGUF blocks (Q4_0/Q4_1/Q8_0)",
    "quip#": "QuIP# (E8P lattice, 2-bit)",
}
PREVIEW_MAX_ROWS = 10


def _gpu(name: str | None) -> dict[str, Any]:
    for gpu in GPUS:
        if gpu["name"] == name:
            return gpu
    if name is None:
        return GPUS[1]
    raise bad_request(
        f"metadata.gpu: {name!r} is not one of {[g['name'] for g in GPUS]}", param="metadata.gpu"
    )


def _model_folder(model: str) -> Path:
    settings = get_settings()
    if model not in settings.base_models:
        raise bad_request(f"model: {model!r} is not one of {settings.base_models}", param="model")
    return settings.models_dir / model


@functools.lru_cache(maxsize=4)
def _tokenizer(folder: Path) -> LightTokenizer | None:
    return load_light_tokenizer(folder)


def _owned_file(session: SessionDep, user: CurrentUser, file_id: str) -> File:
    file = crud.get_file(session=session, user_id=user.id, file_id=file_id)
    if file is None:
        raise not_found("file", file_id, param="file_id")
    return file


# ------------------------------------------------------------------------------- new-job form


@router.get("/options")
def options(user: CurrentUser) -> dict[str, Any]:
    """Choices for the new-job form: base models, quantization methods and their bits, GPUs."""
    return {
        "base_models": get_settings().base_models,
        "quantization_methods": [
            {"name": m, "label": METHOD_LABELS.get(m, m), "bits": METHOD_BITS.get(m, [4])}
            for m in QUANT_METHODS
        ],
        "gpus": GPUS,
    }


class MemoryEstimatePublic(BaseModel):
    peak_bytes: int
    breakdown: dict[str, int]
    gpu: dict[str, Any]
    fits: bool
    advice: str | None = None


@router.post("/memory_estimate", response_model=MemoryEstimatePublic)
def memory_estimate(body: dict[str, Any], user: CurrentUser, session: SessionDep) -> MemoryEstimatePublic:
    """Peak memory of the job described by a POST /v1/fine_tuning/jobs body, and whether it fits
    the GPU named in `metadata.gpu` (one of /options' gpus)."""
    try:
        request = JobCreate.model_validate(body)
        rows = 100
        if request.training_file:
            rows = _owned_file(session, user, request.training_file).rows or rows
        hp = request.requested_hyperparameters().resolve(rows)
    except (ValidationError, ValueError) as e:
        raise bad_request(f"Invalid job: {e}", param="hyperparameters") from e
    gpu = _gpu((request.metadata or {}).get("gpu"))
    config = _model_folder(request.model) / "config.json"
    if not config.is_file():
        raise APIError(
            409,
            f"model: {request.model!r} has not been prepared on this server yet (no {config.name})",
            param="model",
            code="model_not_ready",
        )
    shape = memory.ModelShape.from_folder(config.parent)
    job = memory.job_memory_fields(hp)
    try:
        estimate = memory.estimate_training_memory(
            shape, seq_len=hp["max_seq_len"], micro_batch=hp["micro_batch_size"], **job
        )
    except ValueError as e:
        raise bad_request(str(e), param="hyperparameters") from e
    fits = estimate.total <= gpu["memory_bytes"]
    advice = None
    if not fits:
        micro = memory.largest_fitting_micro_batch(
            shape, gpu["memory_bytes"], micro_batch=hp["micro_batch_size"], seq_len=hp["max_seq_len"], **job
        )
        seq = memory.largest_fitting_seq_len(shape, gpu["memory_bytes"], seq_len=hp["max_seq_len"], **job)
        advice = (
            f"A micro-batch of {micro} would fit."
            if micro
            else f"At micro-batch 1, sequences up to {seq} tokens would fit."
            if seq
            else "Nothing fits at these bits and rank: try fewer bits, checkpointing or a bigger GPU."
        )
    return MemoryEstimatePublic(
        peak_bytes=estimate.total, breakdown=dataclasses.asdict(estimate), gpu=gpu, fits=fits, advice=advice
    )


# ------------------------------------------------------------------------------------ datasets


@router.get("/files/{file_id}/report")
def file_report(
    file_id: str,
    user: CurrentUser,
    session: SessionDep,
    model: str | None = None,
    max_seq_len: Annotated[int, Query(ge=2, le=1 << 20)] = 2048,
) -> dict[str, Any]:
    """The upload's validation report recomputed for `max_seq_len`: format, rows, token-length
    statistics and histogram (`{lo, hi, count}` buckets), rows over the limit, first errors."""
    file = _owned_file(session, user, file_id)
    model = model or get_settings().base_models[0]
    tokenizer = _tokenizer(_model_folder(model))
    report = data.validate_file(storage.file_path(file.id), tokenizer=tokenizer, max_seq_len=max_seq_len)
    return {
        "file_id": file.id,
        "filename": file.filename,
        "format": report.format,
        "rows": report.rows,
        "errors": report.errors,
        "error_count": report.error_count,
        "tokens": report.token_stats,
        "histogram": [
            {"lo": b["start"], "hi": b["end"], "count": b["count"]} for b in report.histogram or []
        ],
        "truncated": report.truncated,
        "max_seq_len": max_seq_len,
        "tokenizer": model if tokenizer else None,
    }


def _segments(
    text: str, example: dict[str, list[int]], offsets: list[tuple[int, int]], max_seq_len: int
) -> list[dict[str, Any]]:
    """Runs of consecutive tokens with the same role: "prompt", "trained" or "truncated"."""

    def role(i: int) -> str:
        return (
            "truncated"
            if i >= max_seq_len
            else "prompt"
            if example["labels"][i] == data.IGNORE_INDEX
            else "trained"
        )

    segments: list[dict[str, Any]] = []
    for i, (start, _) in enumerate(offsets):
        end = offsets[i + 1][0] if i + 1 < len(offsets) else len(text)
        if segments and segments[-1]["role"] == role(i):
            segments[-1]["text"] += text[start:end]
        else:
            segments.append({"role": role(i), "trained": role(i) == "trained", "text": text[start:end]})
    return segments


@router.get("/files/{file_id}/preview")
def file_preview(
    file_id: str,
    user: CurrentUser,
    session: SessionDep,
    model: str | None = None,
    rows: Annotated[int, Query(ge=1, le=PREVIEW_MAX_ROWS)] = 3,
    max_seq_len: Annotated[int, Query(ge=2, le=1 << 20)] = 2048,
) -> dict[str, Any]:
    """The first `rows` rows rendered with the model's chat template exactly as training sees
    them, split into segments whose `trained` flag marks the tokens that carry loss."""
    file = _owned_file(session, user, file_id)
    model = model or get_settings().base_models[0]
    tokenizer = _tokenizer(_model_folder(model))
    if tokenizer is None:
        raise APIError(
            409,
            f"model: {model!r} has not been prepared on this server yet (no tokenizer)",
            param="model",
            code="model_not_ready",
        )
    all_rows = data.read_rows(storage.file_path(file.id))
    fmt = file.format or data.detect_format(all_rows[0])
    previews = []
    for row in all_rows[:rows]:
        text, spans = data.render(row.data, fmt, tokenizer, row.line)
        example = data.tokenize(text, spans, tokenizer)
        offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        trained = sum(label != data.IGNORE_INDEX for label in example["labels"][:max_seq_len])
        previews.append(
            {
                "line": row.line,
                "tokens": len(example["input_ids"]),
                "trained_tokens": trained,
                "segments": _segments(text, example, offsets, max_seq_len),
            }
        )
    return {"file_id": file.id, "model": model, "format": fmt, "rows": previews}


# ---------------------------------------------------------------------------------------- jobs


@router.get("/jobs/progress")
def jobs_progress(user: CurrentUser, session: SessionDep) -> dict[str, Any]:
    """Latest step metrics of each of the user's jobs: step, total_steps, progress, eta_s."""
    latest = (
        select(func.max(JobEvent.pk))
        .join(Job, Job.id == JobEvent.job_id)
        .where(Job.user_id == user.id, JobEvent.type == "metrics")
        .group_by(JobEvent.job_id)
    )
    events = session.scalars(select(JobEvent).where(JobEvent.pk.in_(latest)))
    return {
        "object": "list",
        "data": [
            {
                "id": e.job_id,
                **{k: (e.data or {}).get(k) for k in ("step", "total_steps", "progress", "eta_s")},
            }
            for e in events
        ],
    }


@router.get("/checkpoints")
def checkpoints(user: CurrentUser, session: SessionDep) -> dict[str, Any]:
    """Every checkpoint of the user's jobs, newest first (the playground can serve them)."""
    rows = session.scalars(
        select(Checkpoint)
        .join(Job, Job.id == Checkpoint.job_id)
        .where(Job.user_id == user.id)
        .order_by(Checkpoint.pk.desc())
    )
    return {"object": "list", "data": [{"id": c.id, "job_id": c.job_id, "step": c.step} for c in rows]}


# ----------------------------------------------------------------------------------- downloads


def _zip_folder(folder: Path, name: str) -> FileResponse:
    home = get_settings().home.resolve()
    folder = (folder if folder.is_absolute() else home / folder).resolve()
    if not folder.is_dir() or not folder.is_relative_to(home):
        raise APIError(410, f"The files of {name!r} are no longer on this server", code="artifact_missing")
    tmp = tempfile.NamedTemporaryFile(suffix=".zip", delete=False)
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, Path(name) / path.relative_to(folder))
    tmp.close()
    return FileResponse(
        tmp.name,
        media_type="application/zip",
        filename=f"{name}.zip",
        background=BackgroundTask(storage.remove, Path(tmp.name)),
    )


@router.get("/models/{model_id}/download", response_class=FileResponse)
def download_model(model_id: str, user: CurrentUser, session: SessionDep) -> FileResponse:
    """The fine-tuned model's PEFT adapter folder (adapter_config.json, weights, manifest) as a zip."""
    model = crud.visible_model(session=session, user_id=user.id, model_id=model_id)
    if model is None:
        raise not_found("model", model_id, param="model_id")
    return _zip_folder(Path(model.path), model.id.replace(":", "_"))


@router.get("/checkpoints/{checkpoint_id}/download", response_class=FileResponse)
def download_checkpoint(checkpoint_id: str, user: CurrentUser, session: SessionDep) -> FileResponse:
    """One training checkpoint folder as a zip."""
    checkpoint = session.scalar(
        select(Checkpoint)
        .join(Job, Job.id == Checkpoint.job_id)
        .where(Checkpoint.id == checkpoint_id, Job.user_id == user.id)
    )
    if checkpoint is None:
        raise not_found("checkpoint", checkpoint_id, param="checkpoint_id")
    return _zip_folder(Path(checkpoint.path), checkpoint.id)
