"""Round-to-nearest: the baseline every other quantizer must beat."""

from __future__ import annotations

import torch

from modulora.quant.base import Quantizer, register_quantizer
from modulora.quant.gptq_packed import GPTQLinear, fit_scale_zero, quantize_codes


@register_quantizer
class RTNQuantizer(Quantizer):
    """Each group of `group_size` input channels gets a min/max-fitted scale and zero, then rounds."""

    method = "rtn"
    supported_bits = (2, 3, 4, 8)

    def quantize(
        self, weight: torch.Tensor, bias: torch.Tensor | None, hessian: torch.Tensor | None
    ) -> GPTQLinear:
        out_features, in_features = weight.shape
        bits, group = self.config.bits, self.config.group_size
        group = in_features if group == -1 else group
        w = weight.float()
        codes = torch.empty_like(w, dtype=torch.int32)
        scales, zeros = [], []
        for start in range(0, in_features, group):
            block = w[:, start : start + group]
            scale, zero = fit_scale_zero(block, bits, self.config.sym)
            codes[:, start : start + group] = quantize_codes(block, scale, zero, bits).to(torch.int32)
            scales.append(scale)
            zeros.append(zero)
        g_idx = torch.arange(in_features, device=w.device) // group
        return GPTQLinear.from_codes(
            codes,
            torch.stack(scales),
            torch.stack(zeros).to(torch.int32),
            g_idx,
            bits,
            self.config.group_size,
            bias,
            self.config.sym,
        )
