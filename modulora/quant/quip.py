"""QuIP#: 2-bit weights through randomized Hadamard incoherence, the E8P codebook and BlockLDLQ.

Implemented from the algorithm's description (Tseng et al., "QuIP#", 2024; notes section 2), not
from the GPL-3.0 reference code.

With random sign vectors su [in] and sv [out] and the orthonormal Hadamard transforms Hᵢ, Hₒ of
`gpu_kernels.hadamard`, a weight W [out, in] is rotated to W̃ = Hₒ·diag(sv)·W·diag(su)·Hᵢᵀ, whose
entries are close to Gaussian ("incoherent"), and the Hessian to H̃ = Hᵢ·diag(su)·H·diag(su)·Hᵢᵀ.
BlockLDLQ quantizes W̃/α to E8P points 8 columns at a time with linear feedback of the error
through the block LDL factor of H̃. The layer stores the codes, su and α·sv:

    W_effective = diag(sv)·Hₒᵀ·Ŵ·Hᵢ·diag(su)

so a matmul is: scale by su, Hadamard, decode-and-matmul, transposed Hadamard, scale by sv; never
the dense product (`materialize` builds it for tests, export and dense references).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Self

import torch

from gpu_kernels import e8p_decode, e8p_grid, e8p_matmul, hadamard, hadamard_factors
from gpu_kernels.e8p_matmul import MAX_INPUTS, e8p_matmul_grouped
from modulora.quant.base import QuantConfig, QuantizedLinear, Quantizer, register_format, register_quantizer

##### The storage format #####


@register_format
class E8PLinear(QuantizedLinear):
    """E8P codes with incoherence sign vectors.

    codes int16 [out_features, in_features / 8]: one E8P code word per 8 rotated weights (layout in
    `gpu_kernels.e8p`). su float32 [in_features]: input-side signs (real-valued after tuning).
    sv float32 [out_features]: output-side signs times the codebook scale α.
    """

    format = "e8p"

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias)
        if in_features % 8:
            raise ValueError(
                f"in_features: {in_features} must be a multiple of 8 (E8P codes cover 8 weights)"
            )
        hadamard_factors(in_features)  # raises for dimensions without a built-in Hadamard matrix
        hadamard_factors(out_features)
        self.register_buffer("codes", torch.zeros(out_features, in_features // 8, dtype=torch.int16))
        self.register_buffer("su", torch.ones(in_features))
        self.register_buffer("sv", torch.ones(out_features))

    def decode(self, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        """Ŵ [out, in] in codebook units, in the rotated basis."""
        return e8p_decode(self.codes, dtype)

    def materialize(self, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        w = hadamard(self.decode(torch.float32), transpose=True)  # Ŵ·Hᵢ
        w = hadamard(w.T.contiguous(), transpose=True).T  # Hₒᵀ·Ŵ·Hᵢ
        return (self.sv[:, None] * w * self.su[None, :]).to(dtype)

    # The transforms run in fp32 inside their kernels (sign scaling and casts fused); the
    # decode-and-matmul runs in x's (compute) dtype: one fused kernel for up to 16 rows (decode
    # steps), else decode + cuBLAS (as GPTQ's training matmuls). Nothing here copies from the host,
    # so the products can be captured in a CUDA graph once they have run once.

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        rotated = hadamard(x, pre_scale=self.su)  # x·diag(su)·Hᵢᵀ
        y = e8p_matmul(rotated, self.codes)
        return hadamard(y, transpose=True, post_scale=self.sv)  # ·Hₒ·diag(sv)

    def matmul_t(self, grad: torch.Tensor) -> torch.Tensor:
        rotated = hadamard(grad, pre_scale=self.sv)  # grad·diag(sv)·Hₒᵀ
        g = rotated @ self.decode(grad.dtype)
        return hadamard(g, transpose=True, post_scale=self.su)  # ·Hᵢ·diag(su)

    def format_config(self) -> dict[str, Any]:
        return {"codebook": "e8p", "version": 1}

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, config: dict[str, Any]) -> Self:
        if config.get("codebook", "e8p") != "e8p":
            raise ValueError(f"codebook: {config['codebook']!r} is not one of ['e8p']")
        return cls(in_features, out_features, bias)


class E8PProjections:
    """Several E8P layers of one input (q, k and v; gate and up) as one product, for decode steps.

    One Hadamard kernel rotates x under every layer's su at once (x [..., in] -> [..., I, in]), one
    decode-matmul reads all their codes (`gpu_kernels.e8p_matmul.e8p_matmul_grouped`: at a few rows
    one kernel), and one transposed transform per run of layers with equal output widths applies
    Hₒ and sv: three kernels for q, k and v instead of nine. Built by `fuse_e8p_outputs_`.
    """

    def __init__(
        self,
        codes: torch.Tensor,
        su: torch.Tensor,
        sv: torch.Tensor,
        widths: list[int],
        bias: torch.Tensor | None,
    ) -> None:
        self.codes, self.su, self.sv, self.widths, self.bias = codes, su, sv, widths, bias
        self.in_features, self.out_features = su.shape[1], sum(widths)
        self.runs: list[tuple[int, int, int]] = []  # (first column, layers, width) of equal widths
        start = 0
        for width in widths:
            if self.runs and self.runs[-1][2] == width:
                first, count, _ = self.runs[-1]
                self.runs[-1] = (first, count + 1, width)
            else:
                self.runs.append((start, 1, width))
            start += width

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> the layers' outputs side by side [..., Σ out] in x's dtype."""
        lead = x.shape[:-1]
        rotated = hadamard(x[..., None, :], pre_scale=self.su)  # [..., I, in]
        y = e8p_matmul_grouped(rotated, self.codes, self.widths)
        out = torch.empty_like(y)
        for first, count, width in self.runs:
            columns = slice(first, first + count * width)
            shape = (*lead, count, width)
            sv = self.sv[columns].view(count, width)
            hadamard(
                y[..., columns].view(shape), transpose=True, post_scale=sv, out=out[..., columns].view(shape)
            )
        return out if self.bias is None else out + self.bias.to(out.dtype)


def fuse_e8p_outputs_(layers: Sequence[E8PLinear]) -> E8PProjections | None:
    """One product computing the layers' outputs side by side (`E8PProjections`). Each layer's
    buffers become views into the fused ones, so no code is stored twice and the layers still
    compute alone.

    None when they cannot share one: other input widths, more than 3 layers, bias on some only, or
    an output boundary between layers that is not a multiple of 32 columns (a column block of the
    decode-matmul reads one input).
    """
    first = layers[0]
    widths = [layer.out_features for layer in layers]
    compatible = (
        len(layers) <= MAX_INPUTS
        and all(layer.in_features == first.in_features for layer in layers)
        and all((layer.bias is None) == (first.bias is None) for layer in layers)
        and all(width % 32 == 0 for width in widths[:-1])
    )
    if not compatible:
        return None
    codes = torch.cat([layer.codes for layer in layers])
    su = torch.stack([layer.su for layer in layers])
    sv = torch.cat([layer.sv for layer in layers])
    bias = None if first.bias is None else torch.cat([layer.bias for layer in layers])
    start = 0
    for i, (layer, width) in enumerate(zip(layers, widths, strict=True)):
        end = start + width
        layer.codes, layer.su, layer.sv = codes[start:end], su[i], sv[start:end]
        if bias is not None:
            layer.bias = bias[start:end]
        start = end
    return E8PProjections(codes, su, sv, widths, bias)


##### E8P nearest-point search #####


def _nearest_unshifted(
    y: torch.Tensor, minus_quarter: torch.Tensor, candidates: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest point to each row of y = x − shift among the D̂8 points with an abs-grid magnitude.

    Returns (squared distance, code word, exact) per row; `minus_quarter` [N] bool says which rows
    were shifted by −¼ (encoded in the code word). For an abs vector a the nearest point takes
    the signs of y; when their parity is wrong for a, flipping the coordinate with the smallest
    |y_i|·a_i is the cheapest fix (cost 4·|y_i|·a_i). Only the `candidates` abs vectors nearest to
    |y| are scored (all 256 when None); `exact` marks rows where no other one can win (its distance
    before the parity fix already exceeds the best found).
    """
    grid = e8p_grid().to(y.device)  # [256, 8]
    grid_parity = grid.sum(dim=1).remainder(2).to(torch.int64)  # required parity of the negative count
    lanes = torch.arange(8, device=y.device)
    mag, negative = y.abs(), (y < 0).to(torch.int64)
    dist = mag.pow(2).sum(1, keepdim=True) - 2 * mag @ grid.T + grid.pow(2).sum(dim=1)  # [n, 256]
    if candidates is None:
        index = torch.arange(256, device=y.device).expand_as(dist)
        bound = torch.full_like(dist[:, 0], float("inf"))
    else:
        dist, index = dist.topk(candidates + 1, dim=1, largest=False, sorted=False)
        bound, last = dist.max(dim=1)  # the (candidates+1)-th nearest bounds every abs vector left out
        keep = torch.ones_like(dist, dtype=torch.bool).scatter_(1, last[:, None], False)
        dist, index = dist[keep].view(-1, candidates), index[keep].view(-1, candidates)
    flip_cost, flip_at = (mag[:, None, :] * grid[index]).min(dim=-1)
    mismatch = negative.sum(1, keepdim=True).remainder(2) != grid_parity[index]
    dist = dist + mismatch * 4 * flip_cost
    best, pick = dist.min(dim=1)
    rows = torch.arange(len(pick), device=y.device)
    index = index[rows, pick]
    negative = negative ^ (mismatch[rows, pick, None] & (lanes == flip_at[rows, pick, None]))
    # Signs relative to the stored table (coordinate 0 pre-negated for odd-sum entries); a −¼ shift
    # is encoded by flipping bit 0 (see gpu_kernels.e8p).
    negative[:, 0] ^= grid_parity[index] ^ minus_quarter.to(torch.int64)
    word = (index << 8) | (negative << lanes).sum(1)
    return best, word, best <= bound


def e8p_quantize(x: torch.Tensor, candidates: int = 8) -> torch.Tensor:
    """x [N, 8] (codebook units) -> int16 code words [N] of the nearest of the 65,536 E8P points.

    Both shifts (±¼) are searched in one batch. Exact: the `candidates` nearest abs vectors are
    scored, and rows where another could still win are searched again over all 256.
    """
    n = x.shape[0]
    y = torch.cat((x.float() - 0.25, x.float() + 0.25))
    minus_quarter = torch.arange(2 * n, device=x.device) >= n
    dist, word, exact = _nearest_unshifted(y, minus_quarter, candidates)
    if not exact.all():
        dist[~exact], word[~exact], _ = _nearest_unshifted(y[~exact], minus_quarter[~exact], None)
    best = torch.where(dist[n:] < dist[:n], word[n:], word[:n])
    return torch.where(best >= 2**15, best - 2**16, best).to(torch.int16)


##### BlockLDLQ #####


def block_ldl(h: torch.Tensor, block: int = 8) -> torch.Tensor:
    """L [n, n], unit lower block-triangular, with h = L·D·Lᵀ for a block-diagonal D (blocks of `block`).

    From the Cholesky factor C: L = C·blockdiag(C_kk)⁻¹ and D = blockdiag(C_kk·C_kkᵀ).
    """
    n = h.shape[0]
    try:
        chol = torch.linalg.cholesky(h)
    except torch.linalg.LinAlgError:  # fp32 can fail on a barely definite H; fp64 rarely does
        chol = torch.linalg.cholesky(h.double()).float()
    blocks = chol.view(n // block, block, n // block, block).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    inverse = torch.linalg.inv(blocks)  # [n/block, block, block]
    return torch.einsum("ikj,kjl->ikl", chol.view(n, n // block, block), inverse).reshape(n, n)


def block_ldlq(w: torch.Tensor, h: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """Codes [m, n/8] for w [m, n] (codebook units) minimizing tr((Ŵ − W)·H·(Ŵ − W)ᵀ) greedily.

    With H = L·D·Lᵀ, the error's component on block k is e_k + Σ_{j>k} e_j·L_jk, so blocks are
    quantized from the last to the first, each after subtracting the feedback of the errors e_j
    already made. Feedback from later chunks of `chunk` columns is applied in one matmul per chunk.
    """
    m, n = w.shape
    lower = block_ldl(h)
    codes = torch.empty(m, n // 8, dtype=torch.int16, device=w.device)
    error = torch.zeros_like(w)  # Ŵ − W, filled from the right
    for c1 in range(n, 0, -chunk):
        c0 = max(0, c1 - chunk)
        target = w[:, c0:c1] - error[:, c1:] @ lower[c1:, c0:c1]
        for b1 in range(c1, c0, -8):
            b0 = b1 - 8
            t = target[:, b0 - c0 : b1 - c0] - error[:, b1:c1] @ lower[b1:c1, b0:b1]
            code = e8p_quantize(t)
            codes[:, b0 // 8] = code
            error[:, b0:b1] = e8p_decode(code[:, None], torch.float32) - w[:, b0:b1]
    return codes


##### Sign tuning #####


def proxy_loss(w_eff: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W_eff − W)·H·(W_eff − W)ᵀ) / tr(W·H·Wᵀ): the layer's relative output error on H's inputs."""
    e = w_eff - w
    return float(((e @ h) * e).sum() / ((w @ h) * w).sum())


def tune_signs(
    rotated: torch.Tensor, w: torch.Tensor, h: torch.Tensor, su: torch.Tensor, sv: torch.Tensor, iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Real-valued (su, sv) minimizing tr((diag(sv)·A·diag(su) − W)·H·(…)ᵀ) for the fixed A = `rotated`.

    The loss is quadratic in each vector given the other, so each half-step is solved exactly:
    sv_r = ⟨b_r, w_r⟩_H / ⟨b_r, b_r⟩_H with b_r = a_r ⊙ su, and su solves ((CᵀC) ⊙ H)·su = diag(Cᵀ·W·H)
    with C = diag(sv)·A. Each half-step can only lower the loss.
    """
    wh = w @ h
    ridge = 1e-6 * torch.eye(len(su), device=h.device)
    for _ in range(iters):
        b = rotated * su
        bh = b @ h
        sv = (bh * w).sum(1) / (bh * b).sum(1).clamp(min=1e-12)
        c = sv[:, None] * rotated
        system = (c.T @ c) * h
        system = system + ridge * system.diagonal().mean()
        su = torch.linalg.solve(system, (c * wh).sum(0))
    return su, sv


##### The quantizer #####


@dataclasses.dataclass
class QuipOptions:
    """QuIP#'s `QuantConfig.options`.

    codebook_rms: the rms, in codebook units, that the rotated weights are scaled to before
        rounding (1.05 minimizes the E8P error of Gaussian data).
    tune_signs: after BlockLDLQ, replace the ±1 sign vectors by the real-valued su, sv that minimize
        the layer's proxy loss on its Hessian (closed-form alternating least squares).
    tune_iters: alternating rounds of sign tuning.
    """

    codebook_rms: float = 1.05
    tune_signs: bool = True
    tune_iters: int = 4

    def __post_init__(self) -> None:
        if self.codebook_rms <= 0:
            raise ValueError(f"options.codebook_rms: {self.codebook_rms} must be positive")
        if self.tune_iters < 0:
            raise ValueError(f"options.tune_iters: {self.tune_iters} must be >= 0")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuipOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"options: unknown QuIP# options {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**data)


def rotate_weight(w: torch.Tensor, su: torch.Tensor, sv: torch.Tensor) -> torch.Tensor:
    """W̃ = Hₒ·diag(sv)·W·diag(su)·Hᵢᵀ."""
    rotated = hadamard(sv[:, None] * w * su[None, :])  # ·Hᵢᵀ on the right
    return hadamard(rotated.T.contiguous()).T.contiguous()  # Hₒ· on the left


def rotate_hessian(h: torch.Tensor, su: torch.Tensor) -> torch.Tensor:
    """H̃ = Hᵢ·diag(su)·H·diag(su)·Hᵢᵀ."""
    return rotate_weight(h, su, su)


@register_quantizer
class QuipQuantizer(Quantizer):
    """QuIP# 2-bit: incoherence processing + BlockLDLQ onto E8P (options: `QuipOptions`).

    `config.damp_percent` of the mean Hessian diagonal is added to the diagonal; `config.seed`
    seeds the sign vectors (each call draws fresh ones, so layers get different signs). Without a
    Hessian the identity is used (plain nearest-point rounding of the rotated weight).
    """

    method = "quip#"
    supported_bits = (2,)
    needs_hessian = True

    def __init__(self, config: QuantConfig) -> None:
        super().__init__(config)
        self.options = QuipOptions.from_dict(config.options)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.last_losses: dict[str, float] = {}

    def random_signs(self, n: int, device: torch.device) -> torch.Tensor:
        return (torch.randint(0, 2, (n,), generator=self.generator) * 2 - 1).float().to(device)

    def quantize(
        self, weight: torch.Tensor, bias: torch.Tensor | None, hessian: torch.Tensor | None
    ) -> E8PLinear:
        out_features, in_features = weight.shape
        layer = E8PLinear(in_features, out_features, bias is not None).to(weight.device)
        w = weight.float().clone()
        h = torch.eye(in_features, device=w.device) if hessian is None else hessian.float().clone()
        dead = h.diagonal() == 0
        h[dead, dead] = 1
        w[:, dead] = 0
        undamped = h.clone()
        h += self.config.damp_percent * h.diagonal().mean() * torch.eye(in_features, device=h.device)

        su, sv = self.random_signs(in_features, w.device), self.random_signs(out_features, w.device)
        rotated = rotate_weight(w, su, sv)
        scale = rotated.pow(2).mean().sqrt().clamp(min=1e-12) / self.options.codebook_rms
        codes = block_ldlq(rotated / scale, rotate_hessian(h, su))
        layer.codes.copy_(codes)
        layer.su.copy_(su)
        layer.sv.copy_(sv * scale)

        self.last_losses = {"ldlq": proxy_loss(layer.materialize(torch.float32), w, undamped)}
        if self.options.tune_signs and self.options.tune_iters > 0:
            layer.su.fill_(1.0)
            layer.sv.fill_(1.0)
            fixed = layer.materialize(torch.float32)  # Hₒᵀ·Ŵ·Hᵢ, the part tuning keeps
            su, sv = tune_signs(fixed, w, h, su, sv * scale, self.options.tune_iters)
            layer.su.copy_(su)
            layer.sv.copy_(sv)
            self.last_losses["tuned"] = proxy_loss(layer.materialize(torch.float32), w, undamped)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer
