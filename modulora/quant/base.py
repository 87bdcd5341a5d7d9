"""The quantizer interface: a config, a registry of storage formats and a registry of algorithms.

A *format* is how a frozen weight is stored and materialized (`QuantizedLinear` subclasses: GPTQ
packed integers, NF4, GGUF blocks, ...). A *quantizer* is an algorithm that turns a dense weight
into one of those formats (RTN, OPTQ, NF4, ...). Both register themselves by name, and every module
in `modulora.quant` is imported on first use, so adding a quantizer means adding one file.
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Self, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

QUANT_CONFIG_VERSION = 1


@dataclasses.dataclass
class QuantConfig:
    """How to quantize a model. Fields a method does not use are ignored by it.

    method: registered quantizer name ("rtn", "optq", "nf4", ...).
    bits: code width; each method states the widths it supports.
    group_size: input channels sharing one scale/zero; -1 means one group per output channel.
    sym: symmetric codes (zero fixed at the middle of the range) instead of a fitted zero point.
    act_order: OPTQ visits columns by decreasing Hessian diagonal (GPTQ's desc_act).
    damp_percent: OPTQ adds this fraction of the mean Hessian diagonal to its diagonal.
    true_sequential: OPTQ quantizes q/k/v, then o, then gate/up, then down, re-running the layer
        in between so each group sees the already-quantized outputs of the previous one.
    calibration: path of a file whose text calibrates OPTQ (`modulora.quantize.read_calibration_texts`:
        .txt, .jsonl/.json/.csv rows with `text` or in a training format); None = the shipped C4 sample.
    n_samples, seq_len: number and length (tokens) of the calibration windows; None = sized to the
        device that quantizes (`modulora.quantize.CALIBRATION_SIZES`: 128 × 512 on a GPU).
    options: method-specific settings (documented by each quantizer).
    """

    method: str = "optq"
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    act_order: bool = True
    damp_percent: float = 0.01
    true_sequential: bool = True
    calibration: str | None = None
    n_samples: int | None = None
    seq_len: int | None = None
    seed: int = 0
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    version: int = QUANT_CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits: {self.bits} is not one of 2, 3, 4, 8")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size: {self.group_size} must be positive or -1 (per channel)")
        if not 0 <= self.damp_percent < 1:
            raise ValueError(f"damp_percent: {self.damp_percent} must be in [0, 1)")
        if any(v is not None and v <= 0 for v in (self.n_samples, self.seq_len)):
            raise ValueError("n_samples and seq_len must be positive (or None: sized to the device)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown quantization fields: {sorted(unknown)}")
        return cls(**data)

    def cache_key(self) -> str:
        """Stable identity of the quantized result (used to share quantized bases between jobs)."""
        return json.dumps(self.to_dict(), sort_keys=True)


class _QuantizedMatmul(torch.autograd.Function):
    """y = x·Wᵀ with W re-materialized in forward and again in backward, never saved.

    The layer object rides along as a plain Python argument: its packed buffers are the only state
    backward needs, so nothing is passed to `save_for_backward` and no dense copy of W outlives the
    op. The base weight is frozen, so backward returns the input gradient alone.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer.matmul(x)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return ctx.layer.matmul_t(grad_out), None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes in: the autocast dtype when autocast is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class QuantizedLinear(nn.Module, ABC):
    """A frozen linear layer whose weight [out_features, in_features] is stored packed.

    Subclasses hold their packed tensors as buffers (so the state dict is the checkpoint layout)
    and implement `materialize`. Formats whose weight is a transform of a dense matrix (QuIP#'s
    Hadamard rotations) override `matmul`/`matmul_t` instead of materializing the product.
    """

    format: ClassVar[str]

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @abstractmethod
    def materialize(self, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        """A fresh dense W [out_features, in_features] in `dtype`."""

    @abstractmethod
    def format_config(self) -> dict[str, Any]:
        """JSON-able settings that, with the shapes, rebuild an empty layer of this format."""

    @classmethod
    @abstractmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, config: dict[str, Any]) -> Self:
        """A layer with correctly shaped (uninitialized) buffers, ready for `load_state_dict`."""

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> x·Wᵀ [..., out_features], W materialized in x's dtype."""
        return F.linear(x, self.materialize(x.dtype))

    def matmul_t(self, grad: torch.Tensor) -> torch.Tensor:
        """grad [..., out_features] -> grad·W [..., in_features]: the input gradient."""
        return grad @ self.materialize(grad.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        y = _QuantizedMatmul.apply(x.to(dtype), self)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y

    @property
    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if name != "bias")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"


class Quantizer(ABC):
    """An algorithm that turns one dense linear weight into a `QuantizedLinear`.

    `needs_hessian` quantizers receive H = 2·XᵀX/n over calibration inputs of the layer
    [in_features, in_features] (float32); others receive None.
    """

    method: ClassVar[str]
    supported_bits: ClassVar[tuple[int, ...]]
    needs_hessian: ClassVar[bool] = False

    def __init__(self, config: QuantConfig) -> None:
        if config.bits not in self.supported_bits:
            raise ValueError(
                f"bits: {self.method} supports {', '.join(map(str, self.supported_bits))}, not {config.bits}"
            )
        self.config = config

    @abstractmethod
    def quantize(
        self, weight: torch.Tensor, bias: torch.Tensor | None, hessian: torch.Tensor | None
    ) -> QuantizedLinear:
        """weight [out_features, in_features] (float32) -> a packed layer on the same device."""


FORMATS: dict[str, type[QuantizedLinear]] = {}
QUANTIZERS: dict[str, type[Quantizer]] = {}


FormatT = TypeVar("FormatT", bound=type[QuantizedLinear])
QuantizerT = TypeVar("QuantizerT", bound=type[Quantizer])


def register_format(cls: FormatT) -> FormatT:
    FORMATS[cls.format] = cls
    return cls


def register_quantizer(cls: QuantizerT) -> QuantizerT:
    QUANTIZERS[cls.method] = cls
    return cls
