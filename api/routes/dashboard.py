"""/v1/dashboard: JSON the browser dashboard needs beyond the OpenAI contract.

Form options and the peak-memory and time estimates for the new-job page, a dataset's report for a
chosen sequence length and a preview of rows as the model sees them (trained tokens marked), live
progress of every job, a job's loss curve and log messages, the user's checkpoints, and zip
downloads of adapters and checkpoints. Tokenization goes through the torch-free
`api.tokenizer.LightTokenizer`; only preparing a base model on a fresh server (once, in a
background thread) imports the library's model loader.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse
from pydantic import BaseModel, ValidationError
from sqlalchemy import func, select

from api import crud, storage
from api.deps import CurrentUser, SessionDep
from api.errors import APIError, bad_request, error_responses, not_found
from api.schemas import METHOD_BITS, QUANT_METHODS, JobCreate
from api.tokenizer import LightTokenizer, has_tokenizer
from core.bases import base_model_folder, base_model_source
from core.config import BASE_LEARNING_RATE, get_settings
from core.db.models import Checkpoint, File, Job, JobEvent
from modulora import data, memory, training_defaults
from modulora.model_folder import ModelFolderError

router = APIRouter(prefix="/v1/dashboard", tags=["dashboard"])

GB = 10**9
# Cards people pick from: memory as vendors state it (decimal GB), and the dense bf16 tensor peak
# (TFLOP/s, fp32 accumulate) of the slowest card named, which the time estimate scales by.
GPUS = [
    {"name": "16GB", "label": "16 GB card (T4, V100 16 GB)", "memory_bytes": 16 * GB, "bf16_tflops": 65},
    {"name": "24GB", "label": "24 GB card (RTX 3090/4090, A10)", "memory_bytes": 24 * GB, "bf16_tflops": 71},
    {"name": "40GB", "label": "A100 40 GB", "memory_bytes": 40 * GB, "bf16_tflops": 312},
    {"name": "48GB", "label": "48 GB card (A6000, L40S)", "memory_bytes": 48 * GB, "bf16_tflops": 155},
    {"name": "80GB", "label": "80 GB card (A100, H100)", "memory_bytes": 80 * GB, "bf16_tflops": 312},
    {"name": "141GB", "label": "H200 141 GB", "memory_bytes": 141 * GB, "bf16_tflops": 989},
]
# The time estimate's two constants, fitted to the H200 training-step bench (docs/benchmarks.md:
# LLaMA-7B shape, 4-bit, LoRA r 16 on all linears, checkpointing): 0.093 s for 1 x 512 tokens and
# 0.487 s for 4 x 1024 give 38.6 % of the bf16 peak plus 0.037 s per micro-batch (launches, host).
PEAK_FRACTION = 0.386
MICRO_STEP_OVERHEAD_S = 0.037
METHOD_LABELS = {
    "rtn": "RTN (round to nearest, no calibration)",
    "optq": "OPTQ / GPTQ (calibrated)",
    "nf4": "NF4 (QLoRA's 4-bit normal float)",
    "gguf": "GGUF blocks (Q4_0/Q4_1/Q8_0)",
    "quip#": "QuIP# (E8P lattice, 2-bit)",
}
PREVIEW_MAX_ROWS = 10
PREPARE_RETRY_S = 3


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
        raise bad_request(f"model: {model!r} is not one of {sorted(settings.base_models)}", param="model")
    try:
        return base_model_folder(model)
    except ModelFolderError as e:
        raise bad_request(str(e), param="model", code="invalid_model") from None


# ------------------------------------------------------------------ base models on a fresh server


def _is_prepared(folder: Path) -> bool:
    # A conversion writes its folder under a temporary name and renames it: config.json is there
    # only once everything is.
    return (folder / "config.json").is_file()


def _prepare(model: str) -> Path:
    """Convert the base model into its cached folder (what the first job would do anyway)."""
    from modulora.models import resolve_model  # imports torch: only ever on a fresh server

    return resolve_model(base_model_source(model))


_preparing: dict[str, Future[Path]] = {}
_converted: dict[str, Path] = {}  # a GGUF source's converted folder, found by its conversion
_preparing_lock = threading.Lock()
_preparer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare-model")


def _prepared_folder(model: str) -> Path:
    """The base model's folder with its config and tokenizer, or 503 `model_preparing` while a
    background thread converts it. A failed conversion is reported once and never remembered:
    the next request starts it again."""
    folder = _converted.get(model) or _model_folder(model)
    if _is_prepared(folder):
        return folder
    with _preparing_lock:
        running = _preparing.get(model)
        if running is not None and running.done():
            del _preparing[model]
            error = running.exception()
            if error is not None:
                raise APIError(
                    500,
                    f"model: preparing {model!r} on this server failed ({type(error).__name__}: {error}); "
                    "the next request tries again",
                    type="server_error",
                    param="model",
                    code="model_prepare_failed",
                )
            converted = running.result()
            if converted != folder:  # a GGUF source: its model files are a conversion elsewhere
                folder = _converted[model] = converted
            if _is_prepared(folder):
                return folder
            running = None
        if running is None:
            _preparing[model] = _preparer.submit(_prepare, model)
    raise APIError(
        503,
        f"model: {model!r} is being prepared on this server (its tokenizer and config are converted "
        f"once, on first use; about a minute). Try again in {PREPARE_RETRY_S} s.",
        type="server_error",
        param="model",
        code="model_preparing",
        details={"retry_after_s": PREPARE_RETRY_S},
    )


@functools.lru_cache(maxsize=4)
def _tokenizer_in(folder: Path) -> LightTokenizer:
    return LightTokenizer(folder)


def _tokenizer(model: str) -> LightTokenizer | None:
    """The base model's tokenizer (preparing the model first on a fresh server); None for a model
    folder that has no `tokenizer.json`. Only loaded tokenizers are cached."""
    folder = _prepared_folder(model)
    return _tokenizer_in(folder) if has_tokenizer(folder) else None


def _owned_file(session: SessionDep, user: CurrentUser, file_id: str, param: str = "file_id") -> File:
    file = crud.get_file(session=session, user_id=user.id, file_id=file_id)
    if file is None:
        raise not_found("file", file_id, param=param)
    return file


def _owned_job(session: SessionDep, user: CurrentUser, job_id: str) -> Job:
    job = crud.get_job(session=session, user_id=user.id, job_id=job_id)
    if job is None:
        raise not_found("job", job_id, param="fine_tuning_job_id")
    return job


# ------------------------------------------------------------------------------- new-job form


@router.get("/options")
def options(user: CurrentUser) -> dict[str, Any]:
    """Choices for the new-job form: base models, quantization methods and their bits, GPUs, and
    the base learning rate that `learning_rate_multiplier` scales, and the training defaults the CLI
    and the API share (`modulora.training_defaults`)."""
    return {
        "base_models": list(get_settings().base_models),
        "quantization_methods": [
            {"name": m, "label": METHOD_LABELS.get(m, m), "bits": METHOD_BITS.get(m, [4])}
            for m in QUANT_METHODS
        ],
        "gpus": GPUS,
        "base_learning_rate": BASE_LEARNING_RATE,
        "training_defaults": training_defaults.as_dict(),
    }


class TimeEstimatePublic(BaseModel):
    steps: int
    tokens_per_step: int
    step_seconds: float
    total_seconds: float
    basis: str


class MemoryEstimatePublic(BaseModel):
    peak_bytes: int
    breakdown: dict[str, int]
    gpu: dict[str, Any]
    fits: bool
    advice: str | None = None
    time: TimeEstimatePublic


def _training_flops_per_token(shape: memory.ModelShape, seq_len: int, hp: dict[str, Any]) -> float:
    """Forward FLOPs per token (linears, head, causal attention) times the passes a LoRA step makes:
    forward and input gradients (frozen base weights get none), plus a recomputed forward when
    checkpointing."""
    linears = sum(i * o for i, o in shape.linears().values()) * shape.num_layers
    attention = 2 * shape.num_layers * seq_len * shape.hidden_size
    forward = 2 * (linears + shape.vocab_size * shape.hidden_size) + attention
    return forward * (3 if hp["gradient_checkpointing"] else 2)


def _time_estimate(
    shape: memory.ModelShape, hp: dict[str, Any], rows: int, mean_tokens: float | None, gpu: dict[str, Any]
) -> TimeEstimatePublic:
    steps = hp["n_epochs"] * math.ceil(rows / hp["batch_size"])
    if hp.get("max_steps"):
        steps = min(steps, hp["max_steps"])
    row_tokens = min(hp["max_seq_len"], round(mean_tokens)) if mean_tokens else hp["max_seq_len"]
    tokens_per_step = hp["batch_size"] * row_tokens
    micro_steps = hp["batch_size"] // hp["micro_batch_size"]
    compute_s = (
        tokens_per_step
        * _training_flops_per_token(shape, row_tokens, hp)
        / (gpu["bf16_tflops"] * 1e12 * PEAK_FRACTION)
    )
    step_s = compute_s + micro_steps * MICRO_STEP_OVERHEAD_S
    rows_basis = f"{row_tokens} tokens a row" + ("" if mean_tokens else " (rows assumed full length)")
    return TimeEstimatePublic(
        steps=steps,
        tokens_per_step=tokens_per_step,
        step_seconds=step_s,
        total_seconds=steps * step_s,
        basis=(
            f"{steps} steps of {rows_basis} at {PEAK_FRACTION:.0%} of the card's bf16 peak, fitted to "
            "the H200 training-step benchmark; quantizing the base (cached after the first job) not included"
        ),
    )


@router.post("/memory_estimate", response_model=MemoryEstimatePublic, responses=error_responses(404, 503))
def memory_estimate(request: JobCreate, user: CurrentUser, session: SessionDep) -> MemoryEstimatePublic:
    """Peak memory of the job described by a POST /v1/fine_tuning/jobs body, whether it fits the GPU
    named in `metadata.gpu` (one of /options' gpus), and an estimate of its training time there."""
    rows, mean_tokens = 100, None
    if request.training_file:
        training = _owned_file(session, user, request.training_file, param="training_file")
        rows = training.rows or rows
        mean_tokens = ((training.report or {}).get("token_stats") or {}).get("mean")
    try:
        hp = request.requested_hyperparameters().resolve(rows)
    except (ValidationError, ValueError) as e:
        raise bad_request(f"hyperparameters: {e}", param="hyperparameters") from e
    gpu = _gpu((request.metadata or {}).get("gpu"))
    shape = memory.ModelShape.from_folder(_prepared_folder(request.model))
    job = memory.job_memory_fields(hp)
    try:
        estimate = memory.estimate_training_memory(
            shape, seq_len=hp["max_seq_len"], micro_batch=hp["micro_batch_size"], **job
        )
    except ValueError as e:
        raise bad_request(f"hyperparameters: {e}", param="hyperparameters") from e
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
        peak_bytes=estimate.total,
        breakdown=dataclasses.asdict(estimate),
        gpu=gpu,
        fits=fits,
        advice=advice,
        time=_time_estimate(shape, hp, rows, mean_tokens, gpu),
    )


# ------------------------------------------------------------------------------------ datasets


@router.get("/files/{file_id}/report", responses=error_responses(503))
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
    model = model or next(iter(get_settings().base_models))
    tokenizer = _tokenizer(model)
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


@router.get("/files/{file_id}/preview", responses=error_responses(409, 503))
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
    model = model or next(iter(get_settings().base_models))
    tokenizer = _tokenizer(model)
    if tokenizer is None:
        raise APIError(
            409,
            f"model: the preview needs {model!r}'s tokenizer.json, which its folder on this server lacks",
            param="model",
            code="model_not_ready",
        )
    all_rows = data.read_rows(storage.file_path(file.id))
    if not all_rows:
        return {"file_id": file.id, "model": model, "format": file.format, "rows": []}
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


@router.get("/jobs/{job_id}/loss")
def job_loss(job_id: str, user: CurrentUser, session: SessionDep) -> dict[str, Any]:
    """The job's loss curve as columns (`step`, `train_loss`, `valid_loss`, null where a step has
    none), for overlaying runs on one chart."""
    job = _owned_job(session, user, job_id)
    events = session.scalars(
        select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.type == "metrics").order_by(JobEvent.step)
    )
    steps, train, valid = [], [], []
    for event in events:
        metrics = event.data or {}
        steps.append(event.step)
        train.append(metrics.get("train_loss", metrics.get("loss")))
        valid.append(metrics.get("valid_loss"))
    return {"job_id": job.id, "step": steps, "train_loss": train, "valid_loss": valid}


@router.get("/jobs/{job_id}/messages")
def job_messages(
    job_id: str, user: CurrentUser, session: SessionDep, after: Annotated[int, Query(ge=0)] = 0
) -> dict[str, Any]:
    """The job's log without its per-step metrics, oldest first, from event number `after` on (so a
    page polls only what is new). Each item is a fine-tuning event object plus its number `n`."""
    job = _owned_job(session, user, job_id)
    events = session.scalars(
        select(JobEvent)
        .where(JobEvent.job_id == job.id, JobEvent.type != "metrics", JobEvent.pk > after)
        .order_by(JobEvent.pk)
    )
    return {
        "object": "list",
        "data": [
            {
                "id": e.public_id,
                "n": e.pk,
                "created_at": int(e.created_at.timestamp()),
                "level": e.level,
                "message": e.message,
                "type": e.type,
                "data": e.data,
            }
            for e in events
        ],
    }


@router.get("/checkpoints")
def checkpoints(user: CurrentUser, session: SessionDep) -> dict[str, Any]:
    """Every checkpoint of the user's jobs, newest first (the playground can serve them), with its
    job's base model and suffix so the playground can group them."""
    rows = session.execute(
        select(Checkpoint, Job)
        .join(Job, Job.id == Checkpoint.job_id)
        .where(Job.user_id == user.id)
        .order_by(Checkpoint.pk.desc())
    )
    return {
        "object": "list",
        "data": [
            {
                "id": c.id,
                "job_id": c.job_id,
                "step": c.step,
                "model": job.model,
                "suffix": job.suffix,
                "job_status": job.status,
                "metrics": c.metrics,
            }
            for c, job in rows
        ],
    }


# ----------------------------------------------------------------------------------- downloads


@router.get("/models/{model_id:path}/download", response_class=FileResponse, responses=error_responses(410))
def download_model(model_id: str, user: CurrentUser, session: SessionDep) -> FileResponse:
    """The fine-tuned model's PEFT adapter folder (adapter_config.json, weights, manifest) as a zip."""
    model = crud.visible_model(session=session, user_id=user.id, model_id=model_id)
    if model is None:
        raise not_found("model", model_id, param="model_id")
    return storage.zip_folder(Path(model.path), re.sub(r"[^\w.-]+", "_", model.id))


@router.get(
    "/checkpoints/{checkpoint_id:path}/download", response_class=FileResponse, responses=error_responses(410)
)
def download_checkpoint(checkpoint_id: str, user: CurrentUser, session: SessionDep) -> FileResponse:
    """One training checkpoint folder as a zip (by id or public `…:ckpt-step-N` name)."""
    found = crud.visible_checkpoint(session=session, user_id=user.id, model_id=checkpoint_id)
    if found is None:
        raise not_found("checkpoint", checkpoint_id, param="checkpoint_id")
    return storage.zip_folder(Path(found[0].path), found[0].id)
