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
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from core import lifecycle
from core.bases import base_model_source, check_base_model, job_base, job_quant_config
from core.config import BASE_LEARNING_RATE, get_settings
from core.db.events import record_event
from core.db.models import File, Job, JobEvent, Model, utcnow
from core.db.session import session_scope
from core.phases import record_phase
from core.tasks import TRAIN_TASK
from modulora import memory, training_defaults
from modulora.settings import relative_to_home
from worker.celery_app import app
from worker.checkpoints import register_checkpoints

if TYPE_CHECKING:
    from modulora.tracking import RunLog


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
        _fail(job_id, e.error, f"Job failed: {e.error['message']}")
    except Exception as e:  # anything unexpected still ends the job, with the reason recorded
        _fail(
            job_id,
            {"code": "training_error", "message": f"{type(e).__name__}: {e}", "param": None},
            f"Job failed: {type(e).__name__}: {e}",
        )
    finally:
        heartbeat.stop()


def _fail(job_id: str, error: dict[str, Any], message: str) -> None:
    """End the job `failed`, its checkpoints on disk registered first (the last one can still be
    served and downloaded); it ends `failed` even if that registration fails."""
    try:
        register_checkpoints(job_id)
    finally:
        lifecycle.finish(job_id, "failed", error=error, message=message)


def _run(job_id: str, heartbeat: lifecycle.Heartbeat) -> None:
    """The job's stages, top to bottom; each records what it did as job events."""
    import torch

    from modulora.models import load_model

    job, training, validation = _load_job(job_id)
    _event(job_id, f"Started on {heartbeat.worker} (attempt {job.attempts})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = _prepare_base(job, device)
    files = 1 + (validation is not None)
    _phase(job_id, "validating", "Loading the base model", done=0, total=files, unit="file")
    model, tokenizer = load_model(base, device=device)
    examples = _load_examples(job, training, validation, tokenizer)
    lora_config = _add_lora(model, job.hyperparameters, job.seed)
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
    val_loss = _evaluate(job, model, tokenizer, examples.validation, device, result)
    _phase(job_id, "exporting", "Exporting the adapter (PEFT files and manifest)")
    adapter_dir = _export(job, model, tokenizer, base, lora_config, training, train_loss, val_loss)
    _register_model(job, base, adapter_dir)
    lifecycle.finish(
        job_id,
        "succeeded",
        message="The job has successfully completed",
        fine_tuned_model=job.fine_tuned_model_name(),
        validation_loss=val_loss,
        result_files=[_store_step_metrics(job, val_loss)],
    )


def _event(job_id: str, message: str, **kwargs: Any) -> None:
    with session_scope() as session:
        record_event(session, job_id, message, **kwargs)


def _phase(job_id: str, phase: str, message: str, **progress: Any) -> None:
    """Report what the job is doing now (`core.phases`): on its log and its metrics stream."""
    with session_scope() as session:
        record_phase(session, job_id, phase, message, **progress)


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
    """Refuse a job whose model is not a usable model or cannot fit the device (before anything
    touches the GPU), then find or quantize its base."""
    from modulora.model_folder import ModelFolderError
    from modulora.models import resolve_model

    try:
        check_base_model(job.model, job.hyperparameters["quantization"])
        source = base_model_source(job.model)
    except ModelFolderError as e:
        raise JobFailure("invalid_model", str(e), "model") from None
    check_memory(job, resolve_model(source), device)
    return ensure_base(job, source)


def ensure_base(job: Job, source: str) -> str:
    """The job's base as `load_model` takes it, quantized from `source` (the model's folder or
    built-in name) into the shared cache first if missing."""
    from modulora.models import is_quantized_dir
    from modulora.quantize import quantize_model

    ref = job_base(job.model, job.hyperparameters, job.training_file)
    config = job_quant_config(job.hyperparameters, job.training_file)
    folder = Path(ref)
    if config is None or is_quantized_dir(folder):
        _event(job.id, f"Using the quantized base {folder.name}")
        return ref
    if config.calibration is not None and not Path(config.calibration).is_file():
        raise JobFailure(
            "invalid_calibration_file",
            f"calibration file {Path(config.calibration).name!r} was deleted",
            "hyperparameters.calibration",
        )
    choice = job.hyperparameters.get("calibration", "default")
    calibration = {"default": "the C4 sample", "training_file": "the job's training file"}.get(choice, choice)
    _event(
        job.id,
        f"Quantizing {job.model} with {config.method} to {config.bits} bits, calibrated on {calibration} "
        "(cached for later jobs)",
    )
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    quantize_model(source, config, tmp, progress=QuantizeProgress(job.id))
    try:
        tmp.rename(folder)
    except OSError:  # another worker cached the same base first
        shutil.rmtree(tmp, ignore_errors=True)
    return ref


class QuantizeProgress:
    """The quantizer's progress(done, total) callback as `quantizing` phase reports: the first and
    last layer always, the ones between at most every `every_s` seconds, with the time left at the
    pace so far."""

    def __init__(self, job_id: str, every_s: float = 2.0) -> None:
        self.job_id, self.every_s = job_id, every_s
        self.started = self.reported = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done not in (1, total) and now - self.reported < self.every_s:
            return
        self.reported = now
        eta_s = (now - self.started) / done * (total - done)
        _phase(
            self.job_id,
            "quantizing",
            f"Quantizing layer {done} of {total}",
            done=done,
            total=total,
            unit="layer",
            eta_s=eta_s,
        )


def gpu_available_bytes(device: Any) -> int:
    """The memory free on the device now plus what this process already holds: the same before and
    after the base is loaded (another process, such as the API's inference engine, may hold the rest)."""
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device)


def gpu_budget_bytes(device: Any) -> int:
    """What the job may use on its device: `gpu_available_bytes`, capped by
    MODULORA_GPU_MEMORY_BUDGET_BYTES."""
    configured = get_settings().gpu_memory_budget_bytes
    available = gpu_available_bytes(device)
    return min(available, configured) if configured else available


def check_memory(job: Job, model_dir: Path, device: Any) -> None:
    """Refuse a job whose estimate exceeds what it may use (`gpu_budget_bytes`); the error says what
    would fit."""
    if device.type != "cuda":
        return
    shape = memory.ModelShape.from_folder(model_dir)
    estimate, hint = memory.check_job_memory(shape, job.hyperparameters, gpu_budget_bytes(device))
    if hint is None:
        return
    configured = get_settings().gpu_memory_budget_bytes
    limit = f"{gpu_available_bytes(device) / memory.GIB:.1f} GiB free on {device}" + (
        f", budget {configured / memory.GIB:.1f} GiB" if configured else ""
    )
    raise JobFailure(
        "insufficient_memory",
        f"needs ~{estimate.total / memory.GIB:.1f} GiB; {limit}; {hint}",
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
    packing = job.hyperparameters.get("packing", training_defaults.PACKING)
    files = 1 + (validation is not None)
    _phase(job.id, "validating", f"Validating {training.filename}", done=0, total=files, unit="file")
    train = _examples(files_dir / training.id, tokenizer, max_len, "training_file", packing)
    val = None
    if validation is not None:
        _phase(job.id, "validating", f"Validating {validation.filename}", done=1, total=files, unit="file")
        val = _examples(files_dir / validation.id, tokenizer, max_len, "validation_file", packing)
    _event(job.id, f"Files validated: {len(train)} training and {len(val or [])} validation examples")
    return Examples(train, val)


def _examples(
    path: Path, tokenizer: Any, max_seq_len: int, param: str, packing: bool
) -> list[dict[str, list[int]]]:
    from modulora import data

    report = data.validate_file(path, tokenizer=tokenizer, max_seq_len=max_seq_len)
    if not report.ok:
        first = report.errors[0] if report.errors else {"line": None, "field": None, "message": "no rows"}
        raise JobFailure(
            "invalid_training_file" if param == "training_file" else "invalid_validation_file",
            f"line {first['line']}, field {first['field']}: {first['message']}",
            param,
        )
    return data.build_examples(data.read_rows(path), "auto", tokenizer, max_seq_len, packing=packing)


def _add_lora(model: Any, hp: dict[str, Any], seed: int) -> Any:
    import torch

    from modulora.lora import LoraConfig, add_lora_

    lora_config = LoraConfig(
        r=hp["lora_r"], alpha=hp["lora_alpha"], dropout=hp["lora_dropout"], target_modules=hp["lora_targets"]
    )
    # The adapter's initial weights come from the job's seed, drawn as `modulora finetune --seed`
    # draws them, so a job and the library run of its settings start from the same adapter.
    torch.manual_seed(seed)
    add_lora_(model, lora_config)
    return lora_config


def _train(
    job: Job, model: Any, tokenizer: Any, examples: Examples, device: Any, should_stop: Callable[[], bool]
) -> Any:
    """Finetune with a metrics event per step and checkpoints under `jobs/<job id>/`; every
    checkpoint on disk is registered when training ends (cancelled or not)."""
    output_dir = get_settings().jobs_dir / job.id
    with _run_log(job, output_dir) as run_log:
        recorder = MetricsRecorder(job, run_log)
        result = _finetune_with_oom_retry(
            job,
            model,
            tokenizer,
            examples.train,
            examples.validation,
            output_dir,
            device,
            recorder,
            should_stop,
        )
    register_checkpoints(job.id)
    return result


def _run_log(job: Job, output_dir: Path) -> RunLog:
    """TensorBoard events under `jobs/<id>/tensorboard`, and the job's W&B integration when the
    package is installed (else a warning event says it was skipped)."""
    from modulora.tracking import RunLog, wandb_available

    wandb = next((i["wandb"] for i in job.integrations or [] if i["type"] == "wandb"), None)
    if wandb is not None and not wandb_available():
        _event(
            job.id, "Weights & Biases integration skipped: wandb is not installed on the worker", level="warn"
        )
    run_log = RunLog(output_dir / "tensorboard", wandb=wandb, config=job.hyperparameters)
    if run_log.wandb_dir is not None:
        _event(job.id, f"Logging to Weights & Biases (run files in {relative_to_home(run_log.wandb_dir)})")
    return run_log


RUN_LOG_METRICS = ("train_loss", "valid_loss", "learning_rate", "tokens_per_s", "label_tokens", "epoch")


class MetricsRecorder:
    """The finetune callback: one metrics event per step, progress on the job, new checkpoints, and
    the step's numbers in the run log (TensorBoard, W&B)."""

    def __init__(self, job: Job, run_log: RunLog) -> None:
        self.job, self.run_log = job, run_log

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
            "label_tokens": m.label_tokens,
        }
        if m.val_loss is not None:
            data["valid_loss"] = m.val_loss
        self.run_log.log(m.step, {k: data.get(k) for k in RUN_LOG_METRICS})
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
        register_checkpoints(self.job.id)  # those written since the last step (a step's own comes after it)


def checkpoint_layers_for_budget(job: Job, micro_batch: int, budget_bytes: int) -> int:
    """The fewest decoder layers to checkpoint for the job's step to fit `budget_bytes` (all of them
    when even that does not fit); the choice and its predicted peak are logged and a job event."""
    from modulora.models import resolve_model

    hp = job.hyperparameters
    shape = memory.ModelShape.from_folder(resolve_model(job.model))
    fields = memory.job_memory_fields(hp)
    layers, estimate = memory.layers_to_checkpoint(
        shape, budget_bytes, seq_len=hp["max_seq_len"], micro_batch=micro_batch, **fields
    )
    message = (
        f"Activation checkpointing: {layers} of {shape.num_layers} decoder layers for the "
        f"{budget_bytes / memory.GIB:.1f} GiB budget, predicted peak {estimate.total / memory.GIB:.1f} GiB"
    )
    print(f"job {job.id}: {message}", flush=True)
    data = {"checkpoint_layers": layers, "predicted_peak_bytes": estimate.total, "budget_bytes": budget_bytes}
    _event(job.id, message, data=data)
    return layers


def _train_config(job: Job, output_dir: Path, device: Any, micro_batch: int) -> Any:
    from modulora.train import TrainConfig

    hp = job.hyperparameters
    checkpoint_layers = None  # on CPU there is no budget to spend: every layer recomputes
    if hp["gradient_checkpointing"] and device.type == "cuda":
        checkpoint_layers = checkpoint_layers_for_budget(job, micro_batch, gpu_budget_bytes(device))
    return TrainConfig(
        learning_rate=BASE_LEARNING_RATE * hp["learning_rate_multiplier"],
        epochs=hp["n_epochs"],
        max_steps=hp["max_steps"],
        micro_batch_size=micro_batch,
        gradient_accumulation=hp["batch_size"] // micro_batch,
        seed=job.seed,
        gradient_checkpointing=hp["gradient_checkpointing"],
        checkpoint_layers=checkpoint_layers,
        max_seq_len=hp["max_seq_len"],
        # Jobs stored before these were hyperparameters take the shared defaults.
        schedule=hp.get("schedule", training_defaults.SCHEDULE),
        warmup_ratio=hp.get("warmup_ratio", training_defaults.WARMUP_RATIO),
        weight_decay=hp.get("weight_decay", training_defaults.WEIGHT_DECAY),
        packing=hp.get("packing", training_defaults.PACKING),
        save_every=hp["checkpoint_every"],
        eval_every=hp.get("eval_every", 0),  # jobs created before the setting: only after the last step
        keep_checkpoints=0,  # the worker prunes (worker.checkpoints): it also keeps the best
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

    from modulora.train import finetune, latest_checkpoint, total_steps_for

    micro = job.hyperparameters["micro_batch_size"]
    for attempt in (1, 2):
        resume = latest_checkpoint(output_dir)
        if resume is not None:
            _event(job.id, f"Resuming from checkpoint {resume.name}")
        config = _train_config(job, output_dir, device, micro)
        first = int(resume.name[5:]) if resume is not None else 0
        total = total_steps_for(len(train_examples), config)
        _phase(job.id, "training", f"Training: {total} steps", done=first, total=total, unit="step")
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


def _evaluate(
    job: Job, model: Any, tokenizer: Any, val_examples: Any, device: Any, result: Any
) -> float | None:
    """Validation loss of the trained adapter, when the job has a validation file. Training has
    computed it after its last step, unless that step was taken before a resume."""
    from modulora.eval.tasks import validation_loss

    if not val_examples:
        return None
    val_loss = result.val_losses.get(result.step)
    n = len(val_examples)
    message = f"Evaluating the adapter on {n} validation examples"
    # Progress only when it is known: the evaluation itself reports none.
    _phase(job.id, "evaluating", message, done=n if val_loss is not None else None, total=n, unit="example")
    if val_loss is None:
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
    from modulora.models import transformers_folder

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
        base_model_name_or_path=str(transformers_folder(base)),
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


def _store_step_metrics(job: Job, full_valid_loss: float | None) -> str:
    """OpenAI's step-metrics CSV of the job's metrics events, stored as a `fine-tune-results` file
    of the job's owner (downloadable through /v1/files); its id."""
    import hashlib

    from modulora.tracking import STEP_METRICS_FILE, step_metrics_csv

    with session_scope() as session:
        events = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.type == "metrics")
        )
        rows = [dict(e.data or {}) for e in events]
    if rows and full_valid_loss is not None:
        max(rows, key=lambda r: r["step"])["full_valid_loss"] = full_valid_loss
    content = step_metrics_csv(rows).encode()
    with session_scope() as session:
        file = File(
            user_id=job.user_id,
            filename=STEP_METRICS_FILE,
            purpose="fine-tune-results",
            bytes=len(content),
            sha256=hashlib.sha256(content).hexdigest(),
            rows=len(rows),
            report={},
        )
        session.add(file)
        session.flush()
        path = get_settings().files_dir / file.id
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{file.id}")
        tmp.write_bytes(content)
        os.replace(tmp, path)
        return file.id


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
