"""LoRA finetuning on a (quantized) causal LM: AdamW over the adapter only, checkpoints, exact resume.

    result = finetune(model, tokenizer, examples, TrainConfig(max_steps=100, output_dir="run"),
                      val_examples=val, callback=print, should_stop=lambda: False, resume_from=None)

`model` is a Hugging Face causal LM on which `modulora.lora.add_lora_` already ran: every parameter
with `requires_grad` is trained, nothing else changes. Examples come from `modulora.data.build_examples`.
The data order is a pure function of (seed, epoch), so a checkpoint only needs the step to resume.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import random
import resource
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from modulora.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, trainable_parameters
from modulora.data import IGNORE_INDEX, collate, pad_token_id
from modulora.eval.tasks import validation_loss
from modulora.loss import AUTOCAST_DTYPES, autocast, completion_loss, token_loss_sum
from modulora.step_graph import CaptureError, StepGraphs
from modulora.training_defaults import (
    LEARNING_RATE,
    MAX_SEQ_LEN,
    SCHEDULE,
    SCHEDULES,
    WARMUP_RATIO,
    WEIGHT_DECAY,
)

TRAIN_CONFIG_VERSION = 1
# Graphed steps pad sequences to a multiple of this many tokens: few shapes (few captures, one memory
# pool) at the cost of at most 63 padding tokens per row.
GRAPH_SEQ_MULTIPLE = 64


@dataclasses.dataclass
class TrainConfig:
    """Training hyperparameters. One optimizer step = `gradient_accumulation` micro-batches.
    Defaults shared with the CLI and the API come from `modulora.training_defaults`.

    max_steps: stop after this many optimizer steps (overrides epochs when set).
    warmup_ratio: fraction of the total steps used for warmup when warmup_steps is 0.
    schedule: learning-rate decay after warmup, to 0 for linear/cosine.
    max_grad_norm: gradient clipping (0 disables). dtype: autocast dtype "bf16"/"fp16" or "fp32".
    max_seq_len/packing/train_on_prompt: how the examples were built (recorded in the manifest).
    eval_every/save_every: steps between validations/checkpoints (0: only at the end).
    keep_checkpoints: how many recent checkpoints to keep (0 keeps all).
    cuda_graphs: on a GPU, replay each micro-batch's forward and backward from a CUDA graph
        (`modulora.step_graph`); batches are then padded to `micro_batch_size` rows and a multiple
        of `GRAPH_SEQ_MULTIPLE` tokens, one graph per padded length. Falls back to eager steps if a
        model cannot be captured.
    checkpoint_layers: with gradient_checkpointing, checkpoint only this many decoder layers (None:
        all); the rest keep their activations and skip the recomputation. The worker sets it from
        the job's GPU budget with `modulora.memory.layers_to_checkpoint`.
    """

    learning_rate: float = LEARNING_RATE
    epochs: int = 1
    max_steps: int | None = None
    micro_batch_size: int = 4
    gradient_accumulation: int = 1
    warmup_steps: int = 0
    warmup_ratio: float = WARMUP_RATIO
    schedule: str = SCHEDULE
    weight_decay: float = WEIGHT_DECAY
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 0
    gradient_checkpointing: bool = False
    checkpoint_layers: int | None = None
    max_seq_len: int = MAX_SEQ_LEN
    packing: bool = False
    train_on_prompt: bool = False
    eval_every: int = 0
    eval_batch_size: int = 8
    save_every: int = 0
    keep_checkpoints: int = 2
    output_dir: str | None = None
    dtype: str = "fp32"
    cuda_graphs: bool = True
    version: int = TRAIN_CONFIG_VERSION

    def __post_init__(self) -> None:
        self.adam_betas = tuple(self.adam_betas)
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate: {self.learning_rate} must be positive")
        for name in ("epochs", "micro_batch_size", "gradient_accumulation", "eval_batch_size", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)} must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps: {self.max_steps} must be at least 1 or None")
        for name in (
            "warmup_steps",
            "weight_decay",
            "max_grad_norm",
            "eval_every",
            "save_every",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: {getattr(self, name)} must not be negative")
        if self.checkpoint_layers is not None and self.checkpoint_layers < 0:
            raise ValueError(f"checkpoint_layers: {self.checkpoint_layers} must not be negative")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio: {self.warmup_ratio} must be in [0, 1)")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {', '.join(AUTOCAST_DTYPES)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := set(data) - known:
            raise ValueError(f"unknown training fields: {sorted(unknown)}")
        return cls(**data)


@dataclasses.dataclass
class StepMetrics:
    """One optimizer step, as streamed to users. Memory is the accelerator's (process RSS on CPU)."""

    step: int
    total_steps: int
    epoch: float
    loss: float
    learning_rate: float
    step_time_s: float
    tokens_per_s: float
    trained_tokens: int
    memory_allocated_bytes: int
    memory_peak_bytes: int
    progress: float
    eta_s: float
    val_loss: float | None = None
    label_tokens: int = 0
    """Tokens that carried loss in this step (the loss is their mean)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TrainResult:
    status: str  # "completed" | "cancelled"
    step: int
    total_steps: int
    losses: list[float]  # losses[i] is the loss of step i + 1, including steps before a resume
    val_losses: dict[int, float]
    checkpoint: Path | None


# ---------------------------------------------------------------------------------------------- step modes


def pad_for_graph(batch: dict[str, torch.Tensor], rows: int, pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids/labels right-padded to `rows` rows and a multiple of GRAPH_SEQ_MULTIPLE tokens."""
    length = -(-batch["input_ids"].shape[1] // GRAPH_SEQ_MULTIPLE) * GRAPH_SEQ_MULTIPLE
    padded = {}
    for name, fill in (("input_ids", pad_id), ("labels", IGNORE_INDEX)):
        tensor = batch[name]
        out = tensor.new_full((rows, length), fill)
        out[: tensor.shape[0], : tensor.shape[1]] = tensor
        padded[name] = out
    return padded


def set_activation_checkpointing(model: nn.Module, enabled: bool, layers: int | None = None) -> None:
    """Non-reentrant activation checkpointing on or off, in any transformers 5.x.

    layers: checkpoint only the first `layers` decoder layers (None: all); the others keep their
    activations and skip the recomputation (`modulora.memory.layers_to_checkpoint` picks how many a
    memory budget needs).

    Recent transformers (5.24 here) name it `activation_checkpointing_enable` and warn on the old
    `gradient_checkpointing_enable`; earlier 5.x releases (5.17 on the H200 image) have only the old name.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    if enabled and layers is not None:
        decoder_layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        if not 0 <= layers <= len(decoder_layers):
            raise ValueError(f"checkpoint_layers: {layers} is not in [0, {len(decoder_layers)}]")
        for index, layer in enumerate(decoder_layers):
            layer.gradient_checkpointing = index < layers


# ---------------------------------------------------------------------------------------------- schedule


def _lr_lambda(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if config.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return tuple(torch.randperm(n, generator=generator).tolist())


def _step_batches(
    examples: Sequence[dict[str, list[int]]], config: TrainConfig, first_step: int, total_steps: int
) -> Iterator[tuple[int, float, list[list[dict[str, list[int]]]]]]:
    """(step, epoch, micro-batches) for steps first_step+1 .. total_steps, deterministically."""
    micro_per_epoch = math.ceil(len(examples) / config.micro_batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / config.gradient_accumulation)
    for step in range(first_step, total_steps):
        epoch, within = divmod(step, steps_per_epoch)
        order = _epoch_order(len(examples), config.seed, epoch)
        first = within * config.gradient_accumulation
        micro = range(first, min(first + config.gradient_accumulation, micro_per_epoch))
        mbs = config.micro_batch_size
        batches = [[examples[i] for i in order[m * mbs : (m + 1) * mbs]] for m in micro]
        yield step + 1, epoch + (within + 1) / steps_per_epoch, batches


def total_steps_for(n_examples: int, config: TrainConfig) -> int:
    if config.max_steps is not None:
        return config.max_steps
    micro_per_epoch = math.ceil(n_examples / config.micro_batch_size)
    return config.epochs * math.ceil(micro_per_epoch / config.gradient_accumulation)


# ---------------------------------------------------------------------------------------------- memory


def memory_bytes(device: torch.device) -> tuple[int, int]:
    """(allocated, peak) accelerator memory; on CPU the process's resident and peak resident set."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
    with open("/proc/self/statm") as f:
        resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return resident, max(resident, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


# ---------------------------------------------------------------------------------------------- training


def finetune(
    model: nn.Module,
    tokenizer: Any,
    train_examples: Sequence[dict[str, list[int]]],
    config: TrainConfig,
    val_examples: Sequence[dict[str, list[int]]] | None = None,
    callback: Callable[[StepMetrics], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume_from: str | Path | None = None,
) -> TrainResult:
    """Train the model's trainable (LoRA) parameters; returns how it ended.

    callback(StepMetrics) runs after every optimizer step (keep it cheap). should_stop() is polled
    after every step: when it returns True a checkpoint is written and the status is "cancelled".
    resume_from: a `checkpoints/step-N` folder or an output_dir (its latest checkpoint).
    Checkpoints need `config.output_dir`.
    """
    run = _setup(model, tokenizer, train_examples, config, resume_from)
    status, step = _fit(run, train_examples, val_examples, callback, should_stop)
    return _finish(run, status, step, resume_from)


@dataclasses.dataclass
class _Run:
    """A finetuning run in progress: what `_setup` builds and the fit loop's stages share."""

    model: nn.Module
    tokenizer: Any
    config: TrainConfig
    params: list[nn.Parameter]
    device: torch.device
    pad_id: int
    total_steps: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    state: dict[str, Any]
    """What a checkpoint holds besides the tensors: step, losses, val_losses, trained_tokens."""
    val_losses: dict[int, float]
    resumed_at: int
    graphs: StepGraphs | None
    """Replays each micro-batch's forward and backward on a GPU; None trains eagerly."""
    last_checkpoint: Path | None = None


def _setup(
    model: nn.Module,
    tokenizer: Any,
    train_examples: Sequence[dict[str, list[int]]],
    config: TrainConfig,
    resume_from: str | Path | None,
) -> _Run:
    """Check the inputs, build optimizer, schedule and scaler, seed, restore a checkpoint, and put
    the model in training mode (activation checkpointing, CUDA graphs)."""
    if not train_examples:
        raise ValueError("train_examples: empty")
    params = list(trainable_parameters(model).values())
    if not params:
        raise ValueError("model: no trainable parameters (run modulora.lora.add_lora_ first)")
    if (config.save_every or resume_from is not None) and config.output_dir is None:
        raise ValueError("output_dir: required for checkpoints and resume")
    device = params[0].device

    total_steps = total_steps_for(len(train_examples), config)
    optimizer = torch.optim.AdamW(
        params,
        lr=config.learning_rate,
        betas=config.adam_betas,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
        fused=device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=config.dtype == "fp16")

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    state: dict[str, Any] = {"step": 0, "losses": [], "val_losses": {}, "trained_tokens": 0}
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, scheduler, scaler)
    val_losses = {int(k): v for k, v in state["val_losses"].items()}

    if config.gradient_checkpointing:
        set_activation_checkpointing(model, True, config.checkpoint_layers)
    model.train()
    graphs = None
    if config.cuda_graphs and device.type == "cuda":
        graphs = StepGraphs(model, token_loss_sum, params, AUTOCAST_DTYPES[config.dtype])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return _Run(
        model, tokenizer, config, params, device, pad_token_id(tokenizer), total_steps,
        optimizer, scheduler, scaler, state, val_losses, state["step"], graphs,
    )  # fmt: skip


def _fit(
    run: _Run,
    train_examples: Sequence[dict[str, list[int]]],
    val_examples: Sequence[dict[str, list[int]]] | None,
    callback: Callable[[StepMetrics], None] | None,
    should_stop: Callable[[], bool] | None,
) -> tuple[str, int]:
    """Optimizer steps from where the run stands to the last; (status, last step taken)."""
    config, step, started = run.config, run.resumed_at, time.perf_counter()
    for step, epoch, micro_batches in _step_batches(train_examples, config, run.resumed_at, run.total_steps):
        step_start = time.perf_counter()
        loss, tokens, learning_rate, label_tokens = _step(run, micro_batches)
        run.state["losses"].append(loss)
        run.state["trained_tokens"] += tokens
        val_loss = _validate(run, val_examples, step)
        if callback is not None:
            step_time = time.perf_counter() - step_start
            allocated, peak = memory_bytes(run.device)
            elapsed = time.perf_counter() - started
            callback(
                StepMetrics(
                    step=step,
                    total_steps=run.total_steps,
                    epoch=epoch,
                    loss=loss,
                    learning_rate=learning_rate,
                    step_time_s=step_time,
                    tokens_per_s=tokens / step_time,
                    trained_tokens=run.state["trained_tokens"],
                    memory_allocated_bytes=allocated,
                    memory_peak_bytes=peak,
                    progress=step / run.total_steps,
                    eta_s=elapsed / (step - run.resumed_at) * (run.total_steps - step),
                    val_loss=val_loss,
                    label_tokens=label_tokens,
                )
            )
        if config.save_every and step % config.save_every == 0 and step < run.total_steps:
            _checkpoint(run, step)
        if should_stop is not None and step < run.total_steps and should_stop():
            return "cancelled", step
    return "completed", step


def _step(run: _Run, micro_batches: list[list[dict[str, list[int]]]]) -> tuple[float, int, float, int]:
    """One optimizer step: (loss per label token, tokens seen, the learning rate it used, label tokens)."""
    batches = [collate(b, run.pad_id) for b in micro_batches]
    # Normalize by the step's label-token count so accumulation equals one large batch.
    n_labels = max(1, sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches))
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    step_loss = torch.zeros((), device=run.device)
    for batch in batches:
        step_loss += _micro_batch(run, batch, n_labels)
    if run.config.max_grad_norm:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.params, run.config.max_grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    learning_rate = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=run.graphs is None)  # graphs add into the .grad they captured
    return step_loss.item() / n_labels, tokens, learning_rate, n_labels


def _micro_batch(run: _Run, batch: dict[str, torch.Tensor], n_labels: int) -> torch.Tensor:
    """Forward and backward of one micro-batch (gradients accumulate); its summed loss, detached."""
    if run.graphs is not None:
        try:
            padded = pad_for_graph(batch, run.config.micro_batch_size, run.pad_id)
            scale = run.scaler.scale(torch.full((), 1.0 / n_labels, device=run.device))
            return run.graphs.run({k: v.to(run.device) for k, v in padded.items()}, scale)
        except CaptureError as error:  # a model that cannot be captured trains eagerly
            warnings.warn(f"cuda_graphs: capture failed, training eagerly ({error})", stacklevel=2)
            run.graphs = None
    batch = {k: v.to(run.device) for k, v in batch.items()}
    with autocast(run.config.dtype, run.device):
        loss_sum, _ = completion_loss(run.model, batch)
    run.scaler.scale(loss_sum / n_labels).backward()
    return loss_sum.detach()


def _validate(run: _Run, val_examples: Sequence[dict[str, list[int]]] | None, step: int) -> float | None:
    """Validation loss every `eval_every` steps and after the last one (None when not due)."""
    config = run.config
    due = step == run.total_steps or (config.eval_every and step % config.eval_every == 0)
    if not val_examples or not due:
        return None
    val_loss = validation_loss(run.model, run.tokenizer, val_examples, config.eval_batch_size, config.dtype)
    run.val_losses[step] = val_loss
    run.model.train()
    return val_loss


def _checkpoint(run: _Run, step: int) -> None:
    if run.config.output_dir is None:
        return
    run.state.update(step=step, val_losses=run.val_losses, config=run.config.to_dict())
    run.last_checkpoint = save_checkpoint(
        run.config.output_dir,
        run.model,
        run.optimizer,
        run.scheduler,
        run.scaler,
        run.state,
        run.config.keep_checkpoints,
    )


def _finish(run: _Run, status: str, step: int, resume_from: str | Path | None) -> TrainResult:
    """A final checkpoint when steps were taken, the model back in eval mode, the result."""
    if run.config.output_dir is not None and step > run.resumed_at:
        _checkpoint(run, step)
    elif resume_from is not None:
        run.last_checkpoint = latest_checkpoint(run.config.output_dir)
    run.optimizer.zero_grad(set_to_none=True)  # graphed steps kept .grad allocated between steps
    run.model.eval()
    if run.config.gradient_checkpointing:
        set_activation_checkpointing(run.model, False)
    return TrainResult(
        status, step, run.total_steps, list(run.state["losses"]), run.val_losses, run.last_checkpoint
    )
