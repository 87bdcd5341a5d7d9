"""GPTQ-packed integer weights: the storage format shared by RTN and OPTQ.

Tensors and packing are those of AutoGPTQ/GPTQModel checkpoints (see `gpu_kernels.materialize_gptq`
for the exact layout), so a base quantized here is a standard GPTQ checkpoint and hub checkpoints
load here. We write zero-point format v1 (`zero - 1` stored), the one every GPTQ loader reads, and
read both v1 and v2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Self

import torch

from gpu_kernels import materialize_gptq
from modulora.quant.base import QuantizedLinear, register_format


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack int codes [count, N] (values < 2**bits) along dim 0 into an int32 bit stream [words, N]."""
    count, n = codes.shape
    words = math.ceil(count * bits / 32)
    codes = codes.to(torch.int64)
    positions = torch.arange(count, device=codes.device) * bits
    word, shift = positions // 32, positions % 32
    packed = torch.zeros(words + 1, n, dtype=torch.int64, device=codes.device)
    packed.index_add_(0, word, (codes << shift[:, None]) & 0xFFFFFFFF)
    # Codes that straddle a word boundary (3-bit codes 10 and 21 of every 32) spill into the next word.
    packed.index_add_(0, word + 1, codes >> (32 - shift)[:, None])
    packed = packed[:words]
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def fit_scale_zero(
    w: torch.Tensor, bits: int, sym: bool, xmin: torch.Tensor | None = None, xmax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and integer zero for w [rows, cols] (the grid always contains 0).

    `xmin`/`xmax` override the row range (a clipping search shrinks them). Asymmetric zeros are
    kept >= 1 because format v1 stores `zero - 1` in unsigned bits and cannot hold -1.
    """
    maxq = 2**bits - 1
    xmin = torch.minimum(w.min(dim=1).values if xmin is None else xmin, torch.zeros(1, device=w.device))
    xmax = torch.maximum(w.max(dim=1).values if xmax is None else xmax, torch.zeros(1, device=w.device))
    if sym:
        amax = torch.maximum(-xmin, xmax).clamp(min=1e-8)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2)
        return scale, zero
    span = (xmax - xmin).clamp(min=1e-8)
    scale = span / maxq
    zero = torch.round(-xmin / scale)
    # A row with (almost) no negative values would get zero 0; put one code below 0 instead.
    low = zero < 1
    scale = torch.where(low, xmax.clamp(min=1e-8) / (maxq - 1), scale)
    zero = torch.where(low, torch.ones_like(zero), zero).clamp(max=maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of w [rows, cols] on the grid scale·(q − zero) (scale/zero [rows])."""
    return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, 2**bits - 1)


@register_format
class GPTQLinear(QuantizedLinear):
    """Integer codes of 2/3/4/8 bits with a scale and zero point per (group, output channel)."""

    format = "gptq"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        sym: bool = False,
        desc_act: bool = False,
        zero_offset: int = 1,
    ) -> None:
        super().__init__(in_features, out_features, bias)
        if bits not in (2, 3, 4, 8):
            raise ValueError(f"bits: {bits} is not one of 2, 3, 4, 8")
        self.bits, self.group_size, self.sym, self.desc_act = bits, group_size, sym, desc_act
        self.zero_offset = zero_offset
        groups = 1 if group_size == -1 else math.ceil(in_features / group_size)
        self.register_buffer(
            "qweight", torch.zeros(math.ceil(in_features * bits / 32), out_features, dtype=torch.int32)
        )
        self.register_buffer(
            "qzeros", torch.zeros(groups, math.ceil(out_features * bits / 32), dtype=torch.int32)
        )
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        g_idx: torch.Tensor,
        bits: int,
        group_size: int,
        bias: torch.Tensor | None = None,
        sym: bool = False,
        desc_act: bool = False,
    ) -> GPTQLinear:
        """Pack codes [out, in], scales/zeros [groups, out] and g_idx [in] into a v1 layer."""
        out_features, in_features = codes.shape
        if (zeros < 1).any():
            raise ValueError("zeros: format v1 cannot store a zero point below 1")
        layer = cls(in_features, out_features, bits, group_size, bias is not None, sym, desc_act)
        layer.to(codes.device)
        layer.qweight.copy_(pack_bits(codes.T, bits))
        layer.qzeros.copy_(pack_bits((zeros - 1).T, bits).T)
        layer.scales.copy_(scales.to(torch.float16))
        layer.g_idx.copy_(g_idx.to(torch.int32))
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def materialize(self, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        return materialize_gptq(
            self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.zero_offset, dtype
        )

    def format_config(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "desc_act": self.desc_act,
            "zero_offset": self.zero_offset,
        }

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, config: dict[str, Any]) -> Self:
        return cls(
            in_features,
            out_features,
            config["bits"],
            config["group_size"],
            bias,
            config.get("sym", False),
            config.get("desc_act", False),
            config.get("zero_offset", 1),
        )


def fuse_outputs_(layers: Sequence[GPTQLinear]) -> GPTQLinear | None:
    """One layer computing the layers' outputs side by side (q, k and v of an attention block; gate
    and up of an MLP), so that one product reads all their codes; at batch-1 decode one large
    product streams memory better than three small ones. Each layer's buffers become views into
    the fused layer's, so no code is stored twice and the layers still compute alone.

    None when the layers cannot share one product: other bit widths or groups, different g_idx
    (act-order permutations) or zero offsets, 3-bit codes, or an output width that would split a
    packed zero-point word.
    """
    first = layers[0]
    pack = 32 // first.bits
    compatible = first.bits != 3 and all(
        layer.bits == first.bits
        and layer.group_size == first.group_size
        and layer.zero_offset == first.zero_offset
        and layer.in_features == first.in_features
        and layer.scales.dtype == first.scales.dtype
        and (layer.bias is None) == (first.bias is None)
        and layer.out_features % pack == 0
        and torch.equal(layer.g_idx, first.g_idx)
        for layer in layers
    )
    if not compatible:
        return None
    widths = [layer.out_features for layer in layers]
    with torch.device("meta"):
        fused = GPTQLinear(
            first.in_features, sum(widths), first.bits, first.group_size, first.bias is not None,
            first.sym, first.desc_act, first.zero_offset,
        )  # fmt: skip
    for name in ("qweight", "qzeros", "scales", "bias"):
        if getattr(first, name) is not None:
            setattr(fused, name, torch.cat([getattr(layer, name) for layer in layers], dim=-1))
    fused.g_idx = first.g_idx
    start = 0
    for layer, width in zip(layers, widths, strict=True):
        end = start + width
        layer.qweight = fused.qweight[:, start:end]
        layer.qzeros = fused.qzeros[:, start // pack : end // pack]
        layer.scales = fused.scales[:, start:end]
        layer.g_idx = fused.g_idx
        if layer.bias is not None:
            layer.bias = fused.bias[start:end]
        start = end
    return fused
