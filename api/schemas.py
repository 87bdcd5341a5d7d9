"""Request and response bodies, shaped like OpenAI's files / fine-tuning / models objects.

Our extras (quantization, LoRA, sequence length, step limit) ride inside `hyperparameters`, which
the stock SDK passes through untouched. `"auto"` is resolved at job creation (`resolve`), so the
stored job and every response carry concrete numbers.
"""

from __future__ import annotations

import math
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from modulora import training_defaults
from modulora.targets import ALL_LINEAR

T = TypeVar("T")

QUANT_METHODS = ("rtn", "optq", "nf4", "gguf", "quip#")
# The code widths each method supports (mirrors the quantizers' `supported_bits`, kept torch-free).
METHOD_BITS = {"rtn": [2, 3, 4, 8], "optq": [2, 3, 4, 8], "nf4": [4], "gguf": [4, 8], "quip#": [2]}
"""learning_rate_multiplier scales this (the usual LoRA learning rate)."""


class ListPage(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


# ---------------------------------------------------------------------------------------- files


class FileReport(BaseModel):
    format: str | None = None
    rows: int = 0
    token_stats: dict[str, Any] | None = None
    warnings: list[str] = []


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None
    report: FileReport


class DeletedObject(BaseModel):
    id: str
    object: str
    deleted: bool = True


# ----------------------------------------------------------------------------------------- jobs


# ------------------------------------------------------------------------ hyperparameter bounds
# Every number a job spec may carry, checked at creation so nothing absurd reaches a worker. The
# memory estimate (`api.routes.jobs.check_memory`) then checks what the card can hold.
HP_BOUNDS: dict[str, tuple[float, float]] = {
    "n_epochs": (1, 100),
    "batch_size": (1, 1024),
    "micro_batch_size": (1, 256),
    "lora_r": (1, 1024),
    "lora_alpha": (1e-3, 4096),
    "max_seq_len": (16, 32768),
    "max_steps": (1, 1_000_000),
    "checkpoint_every": (1, 1_000_000),
    "eval_every": (1, 1_000_000),
    "keep_checkpoints": (1, 1000),
    "learning_rate_multiplier": (1e-4, 100),
}
GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
"""-1 is one group per output channel; otherwise powers of two up to 4096."""
SEED_MAX = 2**31 - 1
"""Job seeds are stored as 32-bit integers."""


def _check_bounds(name: str, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value  # "auto", None
    low, high = HP_BOUNDS[name]
    if not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"must be between {low:g} and {high:g} (or 'auto'), got {value}")
    return value


class Hyperparameters(BaseModel):
    """OpenAI's three (each a number or "auto") plus ModuLoRA's extras."""

    model_config = ConfigDict(extra="forbid")

    @field_validator(*HP_BOUNDS)
    @classmethod
    def _within_bounds(cls, value: Any, info: Any) -> Any:
        return _check_bounds(info.field_name, value)

    @field_validator("group_size")
    @classmethod
    def _known_group_size(cls, value: int) -> int:
        if value not in GROUP_SIZES:
            raise ValueError(f"must be one of {list(GROUP_SIZES)}, got {value}")
        return value

    @field_validator("lora_targets")
    @classmethod
    def _known_targets(cls, value: str | list[str]) -> str | list[str]:
        names = [value] if isinstance(value, str) else value
        if value == "all-linear":
            return value
        unknown = [name for name in names if name not in ALL_LINEAR]
        if not names or unknown:
            raise ValueError(f"{unknown or 'an empty list'} not among 'all-linear' or {list(ALL_LINEAR)}")
        return value

    # --------------------------------------------------------------------------------- fields

    n_epochs: int | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | Literal["auto"] = "auto"
    quantization: str = "optq"
    bits: int = 4
    group_size: int = 128
    lora_r: int = training_defaults.LORA_R
    lora_alpha: float = training_defaults.LORA_ALPHA
    lora_dropout: float = training_defaults.LORA_DROPOUT
    lora_targets: str | list[str] = "all-linear"
    max_seq_len: int | Literal["auto"] = "auto"
    micro_batch_size: int | Literal["auto"] = "auto"
    gradient_checkpointing: bool = False
    max_steps: int | None = None
    """Stop after this many optimizer steps (None: n_epochs decides)."""
    checkpoint_every: int | Literal["auto"] = "auto"
    calibration: str = "default"
    """OPTQ's calibration text: "default" (the C4 sample shipped with the library), "training_file"
    (the job's own training rows) or the id of another of the user's files."""

    # --- The learning-rate schedule, weight decay and packing: the same names and defaults as
    # `modulora finetune` (modulora.training_defaults), so a dataset trains alike by either route.
    schedule: Literal["cosine", "linear", "constant"] = training_defaults.SCHEDULE
    warmup_ratio: float = Field(training_defaults.WARMUP_RATIO, ge=0, lt=1)
    weight_decay: float = Field(training_defaults.WEIGHT_DECAY, ge=0)
    packing: bool = training_defaults.PACKING
    # ---
    eval_every: int | Literal["auto"] = "auto"
    """Steps between validation-loss evaluations when the job has a validation file (and after the
    last step); "auto": checkpoint_every, so every checkpoint has its validation loss."""
    keep_checkpoints: int = 3
    """Checkpoints kept: the newest this many plus the best by validation loss; older ones are deleted."""

    @field_validator("quantization")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in QUANT_METHODS:
            raise ValueError(f"quantization: {value!r} is not one of {list(QUANT_METHODS)}")
        return value

    @field_validator("bits")
    @classmethod
    def _known_bits(cls, value: int) -> int:
        if value not in (2, 3, 4, 8):
            raise ValueError(f"bits: {value} is not one of [2, 3, 4, 8]")
        return value

    @model_validator(mode="after")
    def _bits_fit_method(self) -> Hyperparameters:
        if self.bits not in METHOD_BITS[self.quantization]:
            raise ValueError(
                f"bits: {self.quantization} supports {METHOD_BITS[self.quantization]}, not {self.bits}"
            )
        return self

    @field_validator("lora_dropout")
    @classmethod
    def _dropout_range(cls, value: float) -> float:
        if not 0 <= value < 1:
            raise ValueError(f"must be in [0, 1), got {value}")
        return value

    def resolve(self, train_rows: int) -> dict[str, Any]:
        """Replace every "auto" with a concrete value (the job stores only these)."""
        batch = self.batch_size if self.batch_size != "auto" else max(1, min(8, train_rows // 10 or 1))
        micro = self.micro_batch_size if self.micro_batch_size != "auto" else min(batch, 4)
        if batch % micro:
            raise ValueError(f"micro_batch_size: {micro} must divide batch_size {batch}")
        resolved = self.model_dump()
        resolved.update(
            n_epochs=self.n_epochs if self.n_epochs != "auto" else training_defaults.N_EPOCHS,
            batch_size=batch,
            micro_batch_size=micro,
            learning_rate_multiplier=(
                float(self.learning_rate_multiplier) if self.learning_rate_multiplier != "auto" else 1.0
            ),
            max_seq_len=self.max_seq_len if self.max_seq_len != "auto" else training_defaults.MAX_SEQ_LEN,
        )
        steps_per_epoch = -(-train_rows // batch)
        total = resolved["n_epochs"] * steps_per_epoch
        if self.max_steps is not None:
            total = min(total, self.max_steps)
        resolved["checkpoint_every"] = (
            self.checkpoint_every if self.checkpoint_every != "auto" else max(1, total // 10)
        )
        resolved["eval_every"] = (
            self.eval_every if self.eval_every != "auto" else resolved["checkpoint_every"]
        )
        return resolved


class Method(BaseModel):
    type: Literal["supervised"] = "supervised"
    supervised: dict[str, Any] | None = None


class WandbIntegration(BaseModel):
    """OpenAI's Weights & Biases settings. The worker logs offline unless its WANDB_MODE says otherwise."""

    model_config = ConfigDict(extra="forbid")

    project: str = Field(min_length=1)
    name: str | None = None
    entity: str | None = None
    tags: list[str] | None = None


class Integration(BaseModel):
    type: Literal["wandb"]
    wandb: WandbIntegration


SUFFIX_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
"""A suffix lands inside model ids (`ft:<base>:<suffix>:<job>`): no `:`, `/` or spaces."""
METADATA_MAX_PAIRS, METADATA_KEY_MAX, METADATA_VALUE_MAX = 16, 64, 512  # OpenAI's limits


class JobCreate(BaseModel):
    model: str = Field(max_length=255)
    training_file: str = Field(max_length=40)
    validation_file: str | None = Field(None, max_length=40)
    suffix: str | None = Field(None, pattern=SUFFIX_PATTERN)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    metadata: dict[str, str] | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    integrations: list[Integration] | None = Field(None, max_length=8)

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        if len(value) > METADATA_MAX_PAIRS:
            raise ValueError(f"at most {METADATA_MAX_PAIRS} key/value pairs, got {len(value)}")
        for key, item in value.items():
            if not 1 <= len(key) <= METADATA_KEY_MAX:
                raise ValueError(f"keys are 1 to {METADATA_KEY_MAX} characters, got {len(key)}")
            if len(item) > METADATA_VALUE_MAX:
                raise ValueError(f"values are at most {METADATA_VALUE_MAX} characters ({key!r}: {len(item)})")
        return value

    def requested_hyperparameters(self) -> Hyperparameters:
        """`method.supervised.hyperparameters` wins over the deprecated top-level field."""
        if self.method and self.method.supervised and "hyperparameters" in self.method.supervised:
            return Hyperparameters.model_validate(self.method.supervised["hyperparameters"])
        return self.hyperparameters or Hyperparameters()


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    hyperparameters: dict[str, Any]
    training_file: str
    validation_file: str | None
    result_files: list[str] = []
    trained_tokens: int | None
    seed: int
    estimated_finish: int | None
    error: JobError | None
    metadata: dict[str, str] | None
    integrations: list[dict[str, Any]] | None = None
    method: dict[str, Any]
    user_provided_suffix: str | None = None
    estimated_memory_bytes: int | None = None
    validation_loss: float | None = None
    phase: dict[str, Any] | None = None
    """What the job is doing now ({phase, done, total, unit, eta_s, message}, `core.phases`); null
    once it has ended."""


class EventObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None = None


class CheckpointObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuning_job_id: str
    fine_tuned_model_checkpoint: str
    step_number: int
    metrics: dict[str, Any]


# --------------------------------------------------------------------------------------- models


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = None
    root: str | None = None
