"""Estimate a finetuning job's peak accelerator memory before it starts (torch-free).

The API refuses jobs that cannot fit and says what would; the dashboard shows the breakdown.
The model is described by its Hugging Face `config.json` (LLaMA family). Terms:

- quantized weights: every decoder linear at `bits` per weight plus one fp16 scale and zero per
  group of `group_size` inputs;
- dense weights: embeddings and (untied) head in the compute dtype;
- LoRA: A and B for each targeted linear, fp32 weights + gradients + two Adam moments (16 B/param);
- activations: per layer and token, 34·h bytes at 16 bits plus 5·heads·seq for attention scores
  (Korthikanti et al. 2022, "Reducing Activation Recomputation", table 2); a checkpointed layer
  keeps only its input, and while any layer is checkpointed one layer's full activations come
  back during its recomputation. Checkpointing k of the layers (`checkpointed_layers`) spends the
  memory a budget leaves on the others' activations: `layers_to_checkpoint` picks the fewest;
- logits: fp32 logits and their gradient over the vocabulary;
- workspace: one linear re-materialized in the compute dtype (ModuLoRA keeps at most one), twice
  (forward output and backward), and a fixed runtime overhead (CUDA context, allocator slack).

Anchor: LLaMA-7B 4-bit, batch 1, seq 128 needs ~5 GB with QLoRA.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modulora.targets import ALL_LINEAR, target_names

GIB = 1024**3
RUNTIME_OVERHEAD_BYTES = 512 * 1024**2


@dataclasses.dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "vocab_size",
            "num_heads",
            "num_kv_heads",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: {getattr(self, name)} must be positive")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        heads = config["num_attention_heads"]
        return cls(
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            vocab_size=config["vocab_size"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelShape:
        return cls.from_config(json.loads((Path(folder) / "config.json").read_text()))

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each decoder linear, by PEFT module name."""
        h, i = self.hidden_size, self.intermediate_size
        kv = h // self.num_heads * self.num_kv_heads
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    quantized_weights: int
    dense_weights: int
    lora: int
    activations: int
    logits: int
    workspace: int

    @property
    def total(self) -> int:
        return sum(dataclasses.astuple(self))

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self) | {"total": self.total}


def estimate_training_memory(
    shape: ModelShape,
    *,
    bits: int,
    group_size: int,
    lora_r: int,
    lora_targets: str | list[str] | tuple[str, ...] = "all-linear",
    seq_len: int,
    micro_batch: int,
    gradient_checkpointing: bool = False,
    checkpointed_layers: int | None = None,
    compute_bytes: int = 2,
) -> MemoryEstimate:
    """Peak bytes of one training step; `compute_bytes` is 2 for bf16/fp16, 4 for fp32.

    checkpointed_layers: with gradient checkpointing, how many decoder layers recompute their
    activations in the backward pass (None: all of them).
    """
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits: {bits} is not one of 2, 3, 4, 8")
    if lora_r <= 0 or seq_len <= 0 or micro_batch <= 0:
        raise ValueError(
            f"lora_r, seq_len, micro_batch must be positive, got {lora_r}, {seq_len}, {micro_batch}"
        )
    linears = shape.linears()
    targets = target_names(lora_targets)
    unknown = [t for t in targets if t not in linears]
    if unknown:
        raise ValueError(f"lora_targets: {unknown} are not among {list(ALL_LINEAR)}")
    layer_params = sum(i * o for i, o in linears.values())
    groups = layer_params // (group_size if group_size > 0 else shape.hidden_size)
    quantized = shape.num_layers * (layer_params * bits // 8 + groups * 4)
    embeddings = shape.vocab_size * shape.hidden_size
    dense = embeddings * (1 if shape.tie_word_embeddings else 2) * compute_bytes
    lora_params = shape.num_layers * sum(lora_r * (linears[t][0] + linears[t][1]) for t in targets)
    tokens = seq_len * micro_batch
    scale = compute_bytes / 2  # the 34·h rule counts 16-bit activations
    per_layer = int(tokens * (34 * shape.hidden_size + 5 * shape.num_heads * seq_len) * scale)
    checkpointed = 0
    if gradient_checkpointing:
        checkpointed = shape.num_layers if checkpointed_layers is None else checkpointed_layers
        if not 0 <= checkpointed <= shape.num_layers:
            raise ValueError(f"checkpointed_layers: {checkpointed} is not in [0, {shape.num_layers}]")
    layer_input = tokens * shape.hidden_size * compute_bytes
    recomputed = per_layer if checkpointed else 0
    activations = checkpointed * layer_input + (shape.num_layers - checkpointed) * per_layer + recomputed
    largest = max(i * o for i, o in linears.values())
    return MemoryEstimate(
        quantized_weights=quantized,
        dense_weights=dense,
        lora=lora_params * 16,
        activations=activations,
        logits=tokens * shape.vocab_size * 4 * 2,
        workspace=2 * largest * compute_bytes + RUNTIME_OVERHEAD_BYTES,
    )


def layers_to_checkpoint(shape: ModelShape, budget_bytes: int, **job: Any) -> tuple[int, MemoryEstimate]:
    """The fewest decoder layers to checkpoint for the step to fit `budget_bytes`, and the estimate
    with that many (every layer, and its estimate, when even that does not fit).

    Each layer left out of checkpointing saves its recomputation (about a third of its forward and
    backward time) and costs its full activations instead of its input.
    """
    job = {**job, "gradient_checkpointing": True}
    for layers in range(shape.num_layers + 1):
        estimate = estimate_training_memory(shape, checkpointed_layers=layers, **job)
        if estimate.total <= budget_bytes:
            return layers, estimate
    return shape.num_layers, estimate


def largest_fitting_micro_batch(shape: ModelShape, budget_bytes: int, *, micro_batch: int, **job: Any) -> int:
    """The largest micro-batch ≤ `micro_batch` whose estimate fits `budget_bytes` (0: none fits)."""
    for candidate in range(micro_batch, 0, -1):
        if estimate_training_memory(shape, micro_batch=candidate, **job).total <= budget_bytes:
            return candidate
    return 0


def largest_fitting_seq_len(shape: ModelShape, budget_bytes: int, *, seq_len: int, **job: Any) -> int:
    """The largest power-of-two sequence length ≤ `seq_len` that fits at micro-batch 1 (0: none)."""
    candidate = 1 << (seq_len.bit_length() - 1)
    job = {**job, "micro_batch": 1}
    while candidate >= 16:
        if estimate_training_memory(shape, seq_len=candidate, **job).total <= budget_bytes:
            return candidate
        candidate //= 2
    return 0


def job_memory_fields(hp: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved hyperparameters that the estimators take besides sequence length and batch."""
    keys = ("bits", "group_size", "lora_r", "lora_targets", "gradient_checkpointing")
    return {key: hp[key] for key in keys}


def check_job_memory(
    shape: ModelShape, hp: Mapping[str, Any], budget_bytes: int | None
) -> tuple[MemoryEstimate, str | None]:
    """A job's estimate from its resolved hyperparameters, and — when it exceeds `budget_bytes`
    (None: no budget) — a hint naming what would fit (None when the job fits)."""
    job = job_memory_fields(hp)
    seq_len, micro_batch = hp["max_seq_len"], hp["micro_batch_size"]
    estimate = estimate_training_memory(shape, seq_len=seq_len, micro_batch=micro_batch, **job)
    if budget_bytes is None or estimate.total <= budget_bytes:
        return estimate, None
    micro = largest_fitting_micro_batch(shape, budget_bytes, seq_len=seq_len, micro_batch=micro_batch, **job)
    if micro:
        return estimate, f"micro_batch_size={micro} at max_seq_len={seq_len} fits"
    seq = largest_fitting_seq_len(shape, budget_bytes, seq_len=seq_len, **job)
    return estimate, (
        f"max_seq_len={seq} at micro_batch_size=1 fits" if seq else "nothing fits; use fewer bits"
    )
