"""GGUF block formats (llama.cpp Q4_0, Q4_1, Q8_0) as quantized bases, loaded without re-quantization.

A GGUF file's linear weights become `GGUFLinear` layers that keep llama.cpp's blocks: 32 input
channels per block, one fp16 scale `d` per block (and for Q4_1 an fp16 minimum `m`). Buffers, one
row per output channel (see `gpu_kernels.materialize_gguf` for the exact nibble order):

- `scales` float16 [out_features, in_features / 32]
- `mins`   float16 [out_features, in_features / 32] (Q4_1 only)
- `qs`     uint8 [out_features, in_features / 2] (Q4_0/Q4_1) or int8 [out_features, in_features] (Q8_0)

The raw ggml bytes of a row are `[d][m][16 bytes of nibbles]` per Q4_1 block, `[d][16 bytes]` per
Q4_0 block and `[d][32 int8]` per Q8_0 block; `from_ggml` splits them into the tensors above.

The quantizer "gguf" (bits 4 -> Q4_1, or Q4_0 with options={"qtype": "q4_0"}; bits 8 -> Q8_0) is
llama.cpp's reference round-to-nearest, so any dense model can be stored in these blocks too.
"""

from __future__ import annotations

from typing import Any, Self

import numpy as np
import torch

from gpu_kernels import materialize_gguf
from gpu_kernels.materialize_gguf import GGUF_BLOCK, GGUF_QTYPES
from modulora.quant.base import QuantizedLinear, Quantizer, register_format, register_quantizer

# Bytes per block of 32 weights in a ggml tensor: fp16 d [+ fp16 m] + codes.
_BLOCK_BYTES = {"q4_0": 2 + 16, "q4_1": 2 + 2 + 16, "q8_0": 2 + 32}


def _pack_q4(codes: torch.Tensor) -> torch.Tensor:
    """int codes [rows, cols] (0..15) -> uint8 [rows, cols/2] in ggml's order (j | j+16 << 4)."""
    blocks = codes.to(torch.uint8).view(codes.shape[0], -1, GGUF_BLOCK)
    return (blocks[..., :16] | (blocks[..., 16:] << 4)).reshape(codes.shape[0], -1)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1/d with 0 for empty blocks (llama.cpp divides by the float32 scale, before fp16 rounding)."""
    return torch.where(d != 0, 1 / d, torch.zeros_like(d))


@register_format
class GGUFLinear(QuantizedLinear):
    """A linear layer stored in llama.cpp blocks of 32: Q4_0, Q4_1 or Q8_0."""

    format = "gguf"

    def __init__(self, in_features: int, out_features: int, qtype: str, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias)
        if qtype not in GGUF_QTYPES:
            raise ValueError(f"qtype: {qtype!r} is not one of {GGUF_QTYPES}")
        if in_features % GGUF_BLOCK:
            raise ValueError(f"in_features: {in_features} must be a multiple of {GGUF_BLOCK} for GGUF blocks")
        self.qtype = qtype
        n_blocks = in_features // GGUF_BLOCK
        if qtype == "q8_0":
            self.register_buffer("qs", torch.zeros(out_features, in_features, dtype=torch.int8))
        else:
            self.register_buffer("qs", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, n_blocks, dtype=torch.float16))
        self.register_buffer("mins", torch.zeros_like(self.scales) if qtype == "q4_1" else None)

    @classmethod
    def from_ggml(cls, raw: np.ndarray | torch.Tensor, qtype: str, in_features: int) -> GGUFLinear:
        """A layer from a ggml tensor's bytes, uint8 [out_features, in_features / 32 * block bytes]."""
        raw = (
            torch.from_numpy(np.array(raw)) if isinstance(raw, np.ndarray) else raw
        )  # copy: mmap is read-only
        out_features = raw.shape[0]
        blocks = raw.reshape(out_features, in_features // GGUF_BLOCK, _BLOCK_BYTES[qtype])
        layer = cls(in_features, out_features, qtype)
        layer.scales.copy_(blocks[..., 0:2].contiguous().view(torch.float16)[..., 0])
        if qtype == "q4_1":
            layer.mins.copy_(blocks[..., 2:4].contiguous().view(torch.float16)[..., 0])
            layer.qs.copy_(blocks[..., 4:].reshape(out_features, -1))
        elif qtype == "q4_0":
            layer.qs.copy_(blocks[..., 2:].reshape(out_features, -1))
        else:
            layer.qs.copy_(blocks[..., 2:].contiguous().view(torch.int8).reshape(out_features, -1))
        return layer

    @classmethod
    def from_float(cls, weight: torch.Tensor, qtype: str, bias: torch.Tensor | None = None) -> GGUFLinear:
        """llama.cpp's reference quantization (quantize_row_*_ref), bit for bit, of weight [out, in]."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, qtype, bias is not None).to(weight.device)
        w = weight.float().view(out_features, -1, GGUF_BLOCK)
        if qtype == "q4_1":
            low, high = w.amin(-1), w.amax(-1)
            d = (high - low) / 15
            codes = torch.trunc((w - low[..., None]) * _inverse(d)[..., None] + 0.5).clamp(0, 15)
            layer.mins.copy_(low.to(torch.float16))
        elif qtype == "q4_0":
            # d maps the signed value of largest magnitude to -8.
            d = torch.gather(w, -1, w.abs().argmax(-1, keepdim=True))[..., 0] / -8
            codes = torch.trunc(w * _inverse(d)[..., None] + 8.5).clamp(0, 15)
        else:
            d = w.abs().amax(-1) / 127
            x = w * _inverse(d)[..., None]
            codes = torch.sign(x) * torch.floor(x.abs() + 0.5)  # C's roundf: halves away from zero
        if qtype == "q8_0":
            layer.qs.copy_(codes.to(torch.int8).view(out_features, -1))
        else:
            layer.qs.copy_(_pack_q4(codes.view(out_features, -1)))
        layer.scales.copy_(d.to(torch.float16))
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def permute_rows_(self, order: torch.Tensor) -> None:
        """Reorder output channels in place (exact: a block never spans two rows)."""
        for name in ("qs", "scales", "mins"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor[order].contiguous())

    def materialize(self, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        return materialize_gguf(self.qs, self.scales, self.mins, self.qtype, dtype)

    def format_config(self) -> dict[str, Any]:
        return {"qtype": self.qtype}

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, config: dict[str, Any]) -> Self:
        return cls(in_features, out_features, config["qtype"], bias)


@register_quantizer
class GGUFQuantizer(Quantizer):
    """Round-to-nearest into llama.cpp blocks: bits 4 -> Q4_1 (or options={"qtype": "q4_0"}), 8 -> Q8_0."""

    method = "gguf"
    supported_bits = (4, 8)

    def quantize(
        self, weight: torch.Tensor, bias: torch.Tensor | None, hessian: torch.Tensor | None
    ) -> GGUFLinear:
        qtype = "q8_0" if self.config.bits == 8 else self.config.options.get("qtype", "q4_1")
        if qtype not in GGUF_QTYPES or (qtype == "q8_0") != (self.config.bits == 8):
            raise ValueError(
                f"options.qtype: {qtype!r} does not fit bits={self.config.bits}; use q4_0/q4_1 or bits 8"
            )
        return GGUFLinear.from_float(weight, qtype, bias)
