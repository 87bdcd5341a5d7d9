"""NF4 (QLoRA, Dettmers et al. 2023): 4-bit NormalFloat codes with one absmax per block of 64.

The weight [out, in] is flattened row-major and cut into blocks of 64 (the last one zero-padded);
each block is divided by its absolute maximum and every value rounded to the nearest of the 16
NF4 levels. Buffers (bitsandbytes' layout, see `gpu_kernels.materialize_nf4`):

- `packed` uint8 [n_blocks * 32]: two codes per byte, the first element in the high nibble
- `absmax` float32 [n_blocks]

Double quantization of absmax (QLoRA's 8-bit absmax) is not implemented: it saves 0.37 bit per
weight of storage and changes nothing else.
"""

from __future__ import annotations

import math
from typing import Any, Self

import torch

from gpu_kernels import materialize_nf4
from gpu_kernels.materialize_nf4 import NF4_CODEBOOK
from modulora.quant.base import QuantizedLinear, Quantizer, register_format, register_quantizer

NF4_BLOCK = 64


@register_format
class NF4Linear(QuantizedLinear):
    """A linear layer stored as NF4 codes with a float32 absmax per block of `block_size` weights."""

    format = "nf4"

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, block_size: int = NF4_BLOCK
    ) -> None:
        super().__init__(in_features, out_features, bias)
        if block_size <= 0 or block_size % 2:
            raise ValueError(f"block_size: {block_size} must be a positive even number")
        self.block_size = block_size
        n_blocks = math.ceil(in_features * out_features / block_size)
        self.register_buffer("packed", torch.zeros(n_blocks * block_size // 2, dtype=torch.uint8))
        self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.float32))

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, bias: torch.Tensor | None = None, block_size: int = NF4_BLOCK
    ) -> NF4Linear:
        """Round weight [out, in] to the nearest NF4 level of each block's absmax-normalized values."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias is not None, block_size).to(weight.device)
        flat = weight.detach().float().flatten()
        flat = torch.nn.functional.pad(flat, (0, layer.absmax.numel() * block_size - flat.numel()))
        blocks = flat.view(-1, block_size)
        absmax = blocks.abs().amax(dim=1)
        normalized = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
        levels = torch.tensor(NF4_CODEBOOK, device=weight.device)
        # Nearest level = the bucket between consecutive midpoints (no [n, 16] distance matrix).
        codes = torch.bucketize(normalized.flatten(), (levels[1:] + levels[:-1]) / 2).to(torch.uint8)
        layer.packed.copy_((codes[0::2] << 4) | codes[1::2])
        layer.absmax.copy_(absmax)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def materialize(self, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        return materialize_nf4(
            self.packed, self.absmax, self.out_features, self.in_features, self.block_size, dtype
        )

    def format_config(self) -> dict[str, Any]:
        return {"block_size": self.block_size}

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, config: dict[str, Any]) -> Self:
        return cls(in_features, out_features, bias, config.get("block_size", NF4_BLOCK))


@register_quantizer
class NF4Quantizer(Quantizer):
    """QLoRA's NF4: bits 4, blocks of 64 (options={"block_size": n} to change it); no calibration."""

    method = "nf4"
    supported_bits = (4,)

    def quantize(
        self, weight: torch.Tensor, bias: torch.Tensor | None, hessian: torch.Tensor | None
    ) -> NF4Linear:
        return NF4Linear.from_float(weight, bias, int(self.config.options.get("block_size", NF4_BLOCK)))
