"""OPTQ (GPTQ, Frantar et al. 2023): round columns one at a time, pushing each error onto the rest.

For W [out, in] and the layer-input Hessian H = 2·XᵀX/n [in, in], columns are quantized in
order; the rounding error of column i, divided by U_ii (U = upper Cholesky factor of H⁻¹), is
spread over the not-yet-quantized columns through row i of U. Lazy batch updates apply that
within blocks of 128 columns and to the rest of the matrix once per block.

Settings (`QuantConfig`): bits 2/3/4/8, group_size (-1 = per output channel), sym, act_order
(columns by decreasing H_ii, stored through `g_idx`), damp_percent. `options`:
- `static_groups` (False): with act-order, fit every group's grid on the original W up front, so
  groups stay contiguous input ranges (g_idx = i // group_size, no gather at inference).
- `clip_grid` (20): each group's range [min, max] is shrunk by the factor in a grid over
  [1 - max_shrink, 1] that minimizes the activation-weighted error Σ H_ii (w - q)²; 0 turns the
  search off (the plain min/max grid of the reference GPTQ).
- `max_shrink` (0.25): the smallest factor tried is 1 - max_shrink.
- `block_size` (128): columns per lazy batch update.
"""

from __future__ import annotations

import math

import torch

from modulora.quant.base import Quantizer, register_quantizer
from modulora.quant.gptq_packed import GPTQLinear, fit_scale_zero, quantize_codes


def search_scale_zero(
    w: torch.Tensor, bits: int, sym: bool, column_weight: torch.Tensor, grid: int, max_shrink: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) for w [rows, cols] minimizing Σ_c column_weight[c]·(w − q)² (shrunk ranges)."""
    if grid <= 0:
        return fit_scale_zero(w, bits, sym)
    rows, cols = w.shape
    factors = 1 - max_shrink * torch.arange(grid + 1, device=w.device) / grid  # [F], 1.0 first
    xmin, xmax = w.min(dim=1).values, w.max(dim=1).values
    best_error = torch.full((rows,), math.inf, device=w.device)
    scale, zero = torch.empty(rows, device=w.device), torch.empty(rows, device=w.device)
    chunk = max(1, 2**24 // w.numel())  # factors evaluated at once, bounded memory
    for f in factors.split(chunk):
        candidates = w.expand(len(f), rows, cols).reshape(-1, cols)  # [F·rows, cols]
        s, z = fit_scale_zero(
            candidates, bits, sym, (f[:, None] * xmin).flatten(), (f[:, None] * xmax).flatten()
        )
        q = (quantize_codes(candidates, s, z, bits) - z[:, None]) * s[:, None]
        error = ((q - candidates) ** 2 * column_weight).sum(dim=1).view(len(f), rows)
        chunk_error, index = error.min(dim=0)
        better = chunk_error < best_error  # strict: ties keep the wider (earlier) range
        pick = index * rows + torch.arange(rows, device=w.device)
        best_error = torch.where(better, chunk_error, best_error)
        scale, zero = torch.where(better, s[pick], scale), torch.where(better, z[pick], zero)
    return scale, zero


@register_quantizer
class OPTQQuantizer(Quantizer):
    """GPTQ with act-order, groups, damping, lazy block updates and a per-group clipping search."""

    method = "optq"
    supported_bits = (2, 3, 4, 8)
    needs_hessian = True

    def quantize(
        self, weight: torch.Tensor, bias: torch.Tensor | None, hessian: torch.Tensor | None
    ) -> GPTQLinear:
        if hessian is None:
            raise ValueError("hessian: OPTQ needs the layer-input Hessian (calibration data)")
        if weight.device.type != "cpu":
            return self._quantize(weight, bias, hessian)
        # The column loop is thousands of tiny ops: extra CPU threads only add synchronization.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._quantize(weight, bias, hessian)
        finally:
            torch.set_num_threads(threads)

    def _quantize(self, weight: torch.Tensor, bias: torch.Tensor | None, hessian: torch.Tensor) -> GPTQLinear:
        cfg, options = self.config, self.config.options
        bits, sym, maxq = cfg.bits, cfg.sym, 2**cfg.bits - 1
        grid, max_shrink = int(options.get("clip_grid", 20)), float(options.get("max_shrink", 0.25))
        block_size = int(options.get("block_size", 128))
        static_groups = bool(options.get("static_groups", False))
        rows, cols = weight.shape
        group = cols if cfg.group_size == -1 else cfg.group_size
        n_groups = math.ceil(cols / group)

        W = weight.detach().float().clone()
        H = hessian.detach().float().clone().to(W.device)
        dead = H.diagonal() == 0  # inputs that never fire: any value is exact, use 0
        H[dead, dead] = 1
        W[:, dead] = 0
        diag = H.diagonal().clone()

        scales = torch.zeros(n_groups, rows, device=W.device)
        zeros = torch.zeros(n_groups, rows, device=W.device)
        if static_groups:
            for g in range(n_groups):
                cols_g = slice(g * group, (g + 1) * group)
                scales[g], zeros[g] = search_scale_zero(
                    W[:, cols_g], bits, sym, diag[cols_g], grid, max_shrink
                )

        perm = torch.argsort(diag, descending=True) if cfg.act_order else torch.arange(cols, device=W.device)
        W, H, diag = W[:, perm], H[perm][:, perm], diag[perm]
        H.diagonal().add_(cfg.damp_percent * diag.mean())
        Hinv = _upper_cholesky_of_inverse(H)

        codes = torch.zeros(rows, cols, dtype=torch.int32, device=W.device)
        # Group of each permuted column: static groups follow the original index, others the visit order.
        group_of = perm // group if static_groups else torch.arange(cols, device=W.device) // group
        for i1 in range(0, cols, block_size):
            i2 = min(i1 + block_size, cols)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                g = int(group_of[col])
                if not static_groups and col % group == 0:
                    # Fit the group's grid on the current (error-updated) weights of its columns.
                    current = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :group]
                    scales[g], zeros[g] = search_scale_zero(
                        current, bits, sym, diag[col : col + group], grid, max_shrink
                    )
                w = W1[:, i]
                q_codes = torch.clamp(torch.round(w / scales[g]) + zeros[g], 0, maxq)
                codes[:, col] = q_codes.to(torch.int32)
                q = scales[g] * (q_codes - zeros[g])
                err = (w - q) / Hinv1[i, i]
                W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
                Err1[:, i] = err
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

        inverse = torch.argsort(perm)
        g_idx = group_of[inverse].to(torch.int32)  # group of each original input channel
        return GPTQLinear.from_codes(
            codes[:, inverse], scales, zeros.to(torch.int32), g_idx, bits, cfg.group_size,
            bias, sym, desc_act=cfg.act_order and not static_groups,
        )  # fmt: skip


def _upper_cholesky_of_inverse(H: torch.Tensor) -> torch.Tensor:
    """U with UᵀU = H⁻¹; retries with more damping when H is numerically not positive definite."""
    damp = H.diagonal().mean()
    for attempt in range(6):
        L, info = torch.linalg.cholesky_ex(H)
        if info == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        H = H + torch.eye(H.shape[0], device=H.device) * damp * 10.0 ** (attempt - 3)
    raise ValueError("hessian: not positive definite even after extra damping")
