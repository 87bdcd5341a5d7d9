"""The `modulora.train` task: validate → quantized base → LoRA → finetune → evaluate → export.

Thin glue over the library; the job's state lives in the database (`core.lifecycle`). torch and
the library load inside the task, in the fresh child process each job gets.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from core import lifecycle
from core.config import get_settings
from core.db.events import record_event
from core.db.models import Checkpoint, File, Job, Model, utcnow
from core.db.session import session_scope
from core.tasks import TRAIN_TASK
from modulora import memory
from modulora.settings import relative_to_home
from worker.celery_app import app

BASE_LEARNING_RATE = 2e-4


class JobFailure(Exception):
    """Ends the job `failed` with this code, message and param."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.error = {"code": code, "message": message, "param": param}


@app.task(name=TRAIN_TASK, bind=True)
def train(self: Any, job_id: str) -> None:
    run_job(job_id, worker=self.request.hostname or socket.gethostname())


def run_job(job_id: str, worker: str) -> None:
    """Run one job to a final state (a SIGKILL is the only way out without one: see lifecycle)."""
    if not lifecycle.claim(job_id, worker):
        return
    heartbeat = lifecycle.Heartbeat(job_id, worker)
    heartbeat.start()
    try:
        _run(job_id, heartbeat)
    except JobFailure as e:
        lifecycle.finish(job_id, "failed", error=e.error, message=f"Job failed: {e.error['message']}")
    except Exception as e:  # anything unexpected still ends the job, with the reason recorded
        lifecycle.finish(
            job_id,
            "failed",
            error={"code": "training_error", "message": f"{type(e).__name__}: {e}", "param": None},
            message=f"Job failed: {type(e).__name__}: {e}",
        )
    finally:
        heartbeat.stop()


def _event(job_id: str, message: str, **kwargs: Any) -> None:
    with session_scope() as session:
        record_event(session, job_id, message, **kwargs)


def _load_job(job_id: str) -> tuple[Job, File, File | None]:
    with session_scope() as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        assert job is not None, job_id
        training = session.scalar(select(File).where(File.id == job.training_file))
        validation = (
            session.scalar(select(File).where(File.id == job.validation_file))
            if job.validation_file
            else None
        )
    if training is None:
        raise JobFailure(
            "invalid_training_file", f"training file {job.training_file!r} was deleted", "training_file"
        )
    return job, training, validation


def base_dir(job: Job) -> tuple[str, Path | None]:
    """(model reference to load, cache folder to quantize into or None when the base is native)."""
    hp = job.hyperparameters
    if hp["quantization"] == "gguf":
        return f"{job.model}:gguf", None
    config = {
        "model": job.model,
        "method": hp["quantization"],
        "bits": hp["bits"],
        "group_size": hp["group_size"],
    }
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    folder = (
        get_settings().bases_dir / f"{job.model}-{hp['quantization']}-{hp['bits']}b-g{hp['group_size']}-{key}"
    )
    return str(folder), folder


def ensure_base(job: Job) -> str:
    from modulora.models import is_quantized_dir
    from modulora.quant import QuantConfig
    from modulora.quantize import quantize_model

    ref, folder = base_dir(job)
    if folder is None or is_quantized_dir(folder):
        _event(job.id, f"Using the quantized base {Path(ref).name}")
        return ref
    hp = job.hyperparameters
    _event(
        job.id,
        f"Quantizing {job.model} with {hp['quantization']} to {hp['bits']} bits (cached for later jobs)",
    )
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    quantize_model(
        job.model,
        QuantConfig(method=hp["quantization"], bits=hp["bits"], group_size=hp["group_size"], seed=job.seed),
        tmp,
    )
    try:
        tmp.rename(folder)
    except OSError:  # another worker cached the same base first
        shutil.rmtree(tmp, ignore_errors=True)
    return ref


def check_memory(job: Job, model_dir: Path, device: Any) -> None:
    """Refuse a job whose estimate exceeds the device budget; the error says what would fit."""
    import torch

    if device.type != "cuda":
        return
    budget = get_settings().gpu_memory_budget_bytes or torch.cuda.get_device_properties(device).total_memory
    shape = memory.ModelShape.from_folder(model_dir)
    estimate, hint = memory.check_job_memory(shape, job.hyperparameters, budget)
    if hint is None:
        return
    raise JobFailure(
        "insufficient_memory",
        f"needs ~{estimate.total / memory.GIB:.1f} GiB of {budget / memory.GIB:.1f} GiB; {hint}",
        "hyperparameters",
    )


class MetricsRecorder:
    """The finetune callback: one metrics event per step, progress on the job, new checkpoints."""

    def __init__(self, job: Job, output_dir: Path) -> None:
        self.job, self.output_dir = job, output_dir

    def __call__(self, m: Any) -> None:
        data = {
            "step": m.step,
            "total_steps": m.total_steps,
            "train_loss": m.loss,
            "learning_rate": m.learning_rate,
            "step_time_s": m.step_time_s,
            "tokens_per_s": m.tokens_per_s,
            "trained_tokens": m.trained_tokens,
            "memory_allocated_bytes": m.memory_allocated_bytes,
            "memory_peak_bytes": m.memory_peak_bytes,
            "progress": m.progress,
            "eta_s": m.eta_s,
            "epoch": m.epoch,
        }
        if m.val_loss is not None:
            data["valid_loss"] = m.val_loss
        with session_scope() as session:
            record_event(
                session,
                self.job.id,
                f"Step {m.step}/{m.total_steps}: training loss={m.loss:.4f}",
                type="metrics",
                step=m.step,
                data=data,
            )
            job = session.scalar(select(Job).where(Job.id == self.job.id))
            assert job is not None
            job.trained_tokens = m.trained_tokens
            job.estimated_finish = utcnow() + timedelta(seconds=m.eta_s)
        self.register_checkpoints({"step": m.step, "train_loss": m.loss})

    def register_checkpoints(self, metrics: dict[str, Any]) -> None:
        root = self.output_dir / "checkpoints"
        steps = (
            sorted(int(p.name[5:]) for p in root.glob("step-*") if p.name[5:].isdigit())
            if root.is_dir()
            else []
        )
        home = get_settings().home
        with session_scope() as session:
            known = set(session.scalars(select(Checkpoint.step).where(Checkpoint.job_id == self.job.id)))
            for step in steps:
                if step not in known:
                    path = (root / f"step-{step}").relative_to(home)
                    session.add(
                        Checkpoint(
                            job_id=self.job.id,
                            step=step,
                            path=str(path),
                            metrics=metrics if metrics["step"] == step else {"step": step},
                        )
                    )


def _examples(path: Path, tokenizer: Any, max_seq_len: int, param: str) -> list[dict[str, list[int]]]:
    from modulora import data

    report = data.validate_file(path, tokenizer=tokenizer, max_seq_len=max_seq_len)
    if not report.ok:
        first = report.errors[0] if report.errors else {"line": None, "field": None, "message": "no rows"}
        raise JobFailure(
            "invalid_training_file" if param == "training_file" else "invalid_validation_file",
            f"line {first['line']}, field {first['field']}: {first['message']}",
            param,
        )
    return data.build_examples(data.read_rows(path), "auto", tokenizer, max_seq_len)


def _train_config(job: Job, output_dir: Path, device: Any, micro_batch: int) -> Any:
    from modulora.train import TrainConfig

    hp = job.hyperparameters
    return TrainConfig(
        learning_rate=BASE_LEARNING_RATE * hp["learning_rate_multiplier"],
        epochs=hp["n_epochs"],
        max_steps=hp["max_steps"],
        micro_batch_size=micro_batch,
        gradient_accumulation=hp["batch_size"] // micro_batch,
        seed=job.seed,
        gradient_checkpointing=hp["gradient_checkpointing"],
        max_seq_len=hp["max_seq_len"],
        save_every=hp["checkpoint_every"],
        keep_checkpoints=0,
        output_dir=str(output_dir),
        dtype="bf16" if device.type == "cuda" else "fp32",
    )


def _finetune_with_oom_retry(
    job: Job,
    model: Any,
    tokenizer: Any,
    train_examples: Any,
    val_examples: Any,
    output_dir: Path,
    device: Any,
    recorder: MetricsRecorder,
    should_stop: Any,
) -> Any:
    """Out of memory once: halve the micro-batch, double accumulation (same batch), resume."""
    import torch

    from modulora.train import finetune, latest_checkpoint

    micro = job.hyperparameters["micro_batch_size"]
    for attempt in (1, 2):
        resume = latest_checkpoint(output_dir)
        if resume is not None:
            _event(job.id, f"Resuming from checkpoint {resume.name}")
        config = _train_config(job, output_dir, device, micro)
        try:
            return finetune(
                model,
                tokenizer,
                train_examples,
                config,
                val_examples=val_examples,
                callback=recorder,
                should_stop=should_stop,
                resume_from=resume,
            )
        except torch.OutOfMemoryError as e:
            if attempt == 2 or micro == 1:
                raise JobFailure(
                    "out_of_memory", f"out of memory at micro_batch_size={micro}", "hyperparameters"
                ) from e
        # Only here, with the exception gone, are the failed attempt's frames freed (activations and
        # the CUDA-graph memory pool of its training steps), so the cache can give their memory back.
        torch.cuda.empty_cache()
        micro //= 2
        _event(
            job.id,
            f"Out of memory; retrying with micro_batch_size={micro} and gradient accumulation "
            f"{job.hyperparameters['batch_size'] // micro}",
            level="warn",
            data={
                "micro_batch_size": micro,
                "gradient_accumulation": job.hyperparameters["batch_size"] // micro,
            },
        )
    raise AssertionError("unreachable")


def _run(job_id: str, heartbeat: lifecycle.Heartbeat) -> None:
    import torch

    from modulora.eval.tasks import validation_loss
    from modulora.export import export_adapter
    from modulora.lora import LoraConfig, add_lora_
    from modulora.models import load_model, resolve_model

    settings = get_settings()
    job, training, validation = _load_job(job_id)
    hp = job.hyperparameters
    _event(job_id, f"Started on {heartbeat.worker} (attempt {job.attempts})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_memory(job, resolve_model(job.model), device)
    base = ensure_base(job)
    model, tokenizer = load_model(base, device=device)
    max_len = hp["max_seq_len"]
    train_examples = _examples(settings.files_dir / training.id, tokenizer, max_len, "training_file")
    val_examples = None
    if validation is not None:
        val_examples = _examples(settings.files_dir / validation.id, tokenizer, max_len, "validation_file")
    n_val = len(val_examples or [])
    _event(job_id, f"Files validated: {len(train_examples)} training and {n_val} validation examples")
    lora_config = LoraConfig(
        r=hp["lora_r"], alpha=hp["lora_alpha"], dropout=hp["lora_dropout"], target_modules=hp["lora_targets"]
    )
    add_lora_(model, lora_config)
    heartbeat.beat()
    if heartbeat.cancelled.is_set():  # cancelled while the base was being prepared
        lifecycle.finish(job_id, "cancelled", message="Job cancelled before training started")
        return
    output_dir = settings.jobs_dir / job_id
    recorder = MetricsRecorder(job, output_dir)
    result = _finetune_with_oom_retry(
        job,
        model,
        tokenizer,
        train_examples,
        val_examples,
        output_dir,
        device,
        recorder,
        heartbeat.cancelled.is_set,
    )
    train_loss = result.losses[-1] if result.losses else None
    recorder.register_checkpoints({"step": result.step, "train_loss": train_loss})
    if result.status == "cancelled":
        last = result.checkpoint.name if result.checkpoint else "none"
        lifecycle.finish(
            job_id, "cancelled", message=f"Job cancelled at step {result.step}; last checkpoint: {last}"
        )
        return
    val_loss = None
    if val_examples:
        val_loss = validation_loss(
            model, tokenizer, val_examples, dtype="bf16" if device.type == "cuda" else "fp32"
        )
        _event(job_id, f"Validation loss: {val_loss:.4f}", data={"valid_loss": val_loss})
    name = job.fine_tuned_model_name()
    adapter_dir = settings.adapters_dir / job_id
    base_record = relative_to_home(base)
    quant = (
        None if hp["quantization"] == "gguf" else {k: hp[k] for k in ("quantization", "bits", "group_size")}
    )
    export_adapter(
        model,
        adapter_dir,
        base_model=base_record,
        quant_config=quant,
        lora_config=lora_config,
        dataset_sha256=training.sha256,
        tokenizer=tokenizer,
        metrics={"train_loss": train_loss, "valid_loss": val_loss, "job_id": job_id, "model": name},
    )
    with session_scope() as session:
        if (
            session.scalar(select(Model.pk).where(Model.id == name)) is None
        ):  # a redelivery may get here twice
            model_row = Model(
                id=name,
                user_id=job.user_id,
                job_id=job_id,
                parent=job.model,
                base=base_record,
                path=str(adapter_dir.relative_to(settings.home)),
            )
            session.add(model_row)
    lifecycle.finish(
        job_id,
        "succeeded",
        message="The job has successfully completed",
        fine_tuned_model=name,
        validation_loss=val_loss,
    )
