"""The `modulora.train` task, in named stages over the library: load the job → prepare the base →
load the model and data → train → evaluate → export → register the model (`_run`).

The job's state lives in the database (`core.lifecycle`). torch and the library load inside the
task, in the fresh child process each job gets.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from core import lifecycle
from core.bases import job_base, job_quant_config
from core.config import BASE_LEARNING_RATE, get_settings
from core.db.events import record_event
from core.db.models import Checkpoint, File, Job, Model, utcnow
from core.db.session import session_scope
from core.tasks import TRAIN_TASK
from modulora import memory
from modulora.settings import relative_to_home
from worker.celery_app import app


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


def _run(job_id: str, heartbeat: lifecycle.Heartbeat) -> None:
    """The job's stages, top to bottom; each records what it did as job events."""
    import torch

    from modulora.models import load_model

    job, training, validation = _load_job(job_id)
    _event(job_id, f"Started on {heartbeat.worker} (attempt {job.attempts})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = _prepare_base(job, device)
    model, tokenizer = load_model(base, device=device)
    examples = _load_examples(job, training, validation, tokenizer)
    lora_config = _add_lora(model, job.hyperparameters)
    heartbeat.beat()
    if heartbeat.cancelled.is_set():  # cancelled while the base was being prepared
        lifecycle.finish(job_id, "cancelled", message="Job cancelled before training started")
        return
    result = _train(job, model, tokenizer, examples, device, heartbeat.cancelled.is_set)
    if result.status == "cancelled":
        last = result.checkpoint.name if result.checkpoint else "none"
        lifecycle.finish(
            job_id, "cancelled", message=f"Job cancelled at step {result.step}; last checkpoint: {last}"
        )
        return
    train_loss = result.losses[-1] if result.losses else None
    val_loss = _evaluate(job, model, tokenizer, examples.validation, device)
    adapter_dir = _export(job, model, tokenizer, base, lora_config, training, train_loss, val_loss)
    _register_model(job, base, adapter_dir)
    lifecycle.finish(
        job_id,
        "succeeded",
        message="The job has successfully completed",
        fine_tuned_model=job.fine_tuned_model_name(),
        validation_loss=val_loss,
    )


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


def _prepare_base(job: Job, device: Any) -> str:
    """Refuse a job that cannot fit the device, then find or quantize its base."""
    from modulora.models import resolve_model

    check_memory(job, resolve_model(job.model), device)
    return ensure_base(job)


def ensure_base(job: Job) -> str:
    """The job's base as `load_model` takes it, quantized into the shared cache first if missing."""
    from modulora.models import is_quantized_dir
    from modulora.quantize import quantize_model

    ref, config = job_base(job.model, job.hyperparameters), job_quant_config(job.hyperparameters)
    folder = Path(ref)
    if config is None or is_quantized_dir(folder):
        _event(job.id, f"Using the quantized base {folder.name}")
        return ref
    _event(
        job.id, f"Quantizing {job.model} with {config.method} to {config.bits} bits (cached for later jobs)"
    )
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    quantize_model(job.model, config, tmp)
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


@dataclasses.dataclass
class Examples:
    """A job's tokenized examples (`modulora.data.build_examples`)."""

    train: list[dict[str, list[int]]]
    validation: list[dict[str, list[int]]] | None


def _load_examples(job: Job, training: File, validation: File | None, tokenizer: Any) -> Examples:
    """The job's files validated and tokenized with the base's tokenizer."""
    files_dir, max_len = get_settings().files_dir, job.hyperparameters["max_seq_len"]
    train = _examples(files_dir / training.id, tokenizer, max_len, "training_file")
    val = None
    if validation is not None:
        val = _examples(files_dir / validation.id, tokenizer, max_len, "validation_file")
    _event(job.id, f"Files validated: {len(train)} training and {len(val or [])} validation examples")
    return Examples(train, val)


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


def _add_lora(model: Any, hp: dict[str, Any]) -> Any:
    from modulora.lora import LoraConfig, add_lora_

    lora_config = LoraConfig(
        r=hp["lora_r"], alpha=hp["lora_alpha"], dropout=hp["lora_dropout"], target_modules=hp["lora_targets"]
    )
    add_lora_(model, lora_config)
    return lora_config


def _train(
    job: Job, model: Any, tokenizer: Any, examples: Examples, device: Any, should_stop: Callable[[], bool]
) -> Any:
    """Finetune with a metrics event per step and checkpoints under `jobs/<job id>/`; every
    checkpoint on disk is registered when training ends (cancelled or not)."""
    output_dir = get_settings().jobs_dir / job.id
    recorder = MetricsRecorder(job, output_dir)
    result = _finetune_with_oom_retry(
        job, model, tokenizer, examples.train, examples.validation, output_dir, device, recorder, should_stop
    )
    recorder.register_checkpoints(
        {"step": result.step, "train_loss": result.losses[-1] if result.losses else None}
    )
    return result


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
        with session_scope() as session:
            known = set(session.scalars(select(Checkpoint.step).where(Checkpoint.job_id == self.job.id)))
            for step in steps:
                if step not in known:
                    session.add(
                        Checkpoint(
                            job_id=self.job.id,
                            step=step,
                            path=relative_to_home(root / f"step-{step}"),
                            metrics=metrics if metrics["step"] == step else {"step": step},
                        )
                    )


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


def _evaluate(job: Job, model: Any, tokenizer: Any, val_examples: Any, device: Any) -> float | None:
    """Validation loss of the trained adapter, when the job has a validation file."""
    from modulora.eval.tasks import validation_loss

    if not val_examples:
        return None
    val_loss = validation_loss(
        model, tokenizer, val_examples, dtype="bf16" if device.type == "cuda" else "fp32"
    )
    _event(job.id, f"Validation loss: {val_loss:.4f}", data={"valid_loss": val_loss})
    return val_loss


def _export(
    job: Job,
    model: Any,
    tokenizer: Any,
    base: str,
    lora_config: Any,
    training: File,
    train_loss: float | None,
    val_loss: float | None,
) -> Path:
    """The adapter as PEFT files + manifest under `adapters/<job id>/`."""
    from modulora.export import export_adapter

    hp = job.hyperparameters
    adapter_dir = get_settings().adapters_dir / job.id
    # A worker killed mid-export left its temporary folder (named by its pid); the job is ours now.
    for stale in adapter_dir.parent.glob(f".{adapter_dir.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    quant = (
        None if hp["quantization"] == "gguf" else {k: hp[k] for k in ("quantization", "bits", "group_size")}
    )
    export_adapter(
        model,
        adapter_dir,
        base_model=relative_to_home(base),
        quant_config=quant,
        lora_config=lora_config,
        dataset_sha256=training.sha256,
        tokenizer=tokenizer,
        metrics={
            "train_loss": train_loss,
            "valid_loss": val_loss,
            "job_id": job.id,
            "model": job.fine_tuned_model_name(),
        },
    )
    return adapter_dir


def _register_model(job: Job, base: str, adapter_dir: Path) -> None:
    """A `Model` row for the adapter, once (a redelivered job may get here twice)."""
    name = job.fine_tuned_model_name()
    with session_scope() as session:
        if session.scalar(select(Model.pk).where(Model.id == name)) is None:
            session.add(
                Model(
                    id=name,
                    user_id=job.user_id,
                    job_id=job.id,
                    parent=job.model,
                    base=relative_to_home(base),
                    path=relative_to_home(adapter_dir),
                )
            )
