"""Fused E8P decode + matmul for a few rows (decode steps): y = x·Ŵᵀ, Ŵ decoded tile by tile in registers.

Layouts: x [M, K] fp16/bf16 with M <= `MAX_ROWS`, codes int16 [N, K/8] (`gpu_kernels.e8p`); y [M, N]
in x's dtype. For fused projections (q, k and v of a decode step, each rotated by its own sign
vector) x is [M, I, K] with I <= 3 inputs and `widths` (I ints summing to N) says which output
columns read which input: columns [0, widths[0]) read x[:, 0], the next widths[1] x[:, 1], and so on.

Each program owns BLOCK_N output columns and a slice of the reduction (split-K), and walks it in
steps of BLOCK_G code words (8·BLOCK_G inputs): load the [BLOCK_N, BLOCK_G] codes once, decode
them (`decode_e8p_values`: one gather of eight values per code, a sign XOR and a shift add per
weight) and multiply by every row of x, either
- on CUDA cores (ROWS = 1): products summed over each code's eight weights in registers, or
- on tensor cores (ROWS = 16): `tl.dot` of the padded x tile with the decoded tile (E8P values are
  exact in fp16 and bf16; fp32 accumulation).
The split's partial sums meet in `gptq_gemv.add_split` (fp32 atomics into a workspace that is zero
between calls; the last program to arrive writes y in x's dtype), so a product is one kernel and
the dense Ŵ never exists: a decode step reads 2 bits a weight. Tiles, the split and the form (a
one-row product may run either) are chosen per shape by timing (`_dispatch.fastest_config`).
Many rows, other dtypes and CPU tensors use decode + F.linear.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from gpu_kernels._dispatch import (
    dependent_launch,
    fastest_config,
    interpreting,
    launchable,
    split_k_workspace,
    triton_available,
    use_triton,
)
from gpu_kernels.e8p import e8p_decode, e8p_decode_ref, e8p_values
from gpu_kernels.gptq_gemv import words_per_split

MAX_ROWS = 16
MAX_INPUTS = 3

if triton_available():
    import triton
    import triton.language as tl

    from gpu_kernels._pdl import wait_for_inputs
    from gpu_kernels.e8p import decode_e8p_values
    from gpu_kernels.gptq_gemv import add_split

    @triton.jit
    def _e8p_matmul_kernel(
        x_ptr, codes_ptr, values_ptr, y_ptr, acc_ptr, arrivals_ptr,
        M, N, n_codes, codes_per_split, n_splits, end_0, end_1,
        stride_xm, stride_xi, stride_cn, stride_ym,
        ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, ATOMIC: tl.constexpr,
        DOT_DTYPE: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """Program (n, s): columns [n·BLOCK_N, (n+1)·BLOCK_N), code words of split s, all rows.
        Columns from `end_0` on read input 1 of x, from `end_1` on input 2 (a block never straddles)."""
        wait_for_inputs(PDL)
        pid_n, pid_s = tl.program_id(0), tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        source = (pid_n * BLOCK_N >= end_0).to(tl.int64) + (pid_n * BLOCK_N >= end_1).to(tl.int64)
        x_input = x_ptr + source * stride_xi
        g_begin = pid_s * codes_per_split
        g_end = tl.minimum(g_begin + codes_per_split, n_codes)
        code_rows = codes_ptr + offs_n.to(tl.int64)[:, None] * stride_cn
        offs_m = tl.arange(0, ROWS)
        lane = tl.arange(0, 8)
        # Sums through tl.reduce with the standard library's combine function: tl.sum (a JIT function)
        # cannot be called by the interpreter from a kernel imported before it was enabled, and
        # this combine function is the one the interpreter sums with NumPy.
        if ROWS == 1:
            acc = tl.full((BLOCK_N, BLOCK_G), 0.0, tl.float32)
        else:
            acc = tl.full((ROWS, BLOCK_N), 0.0, tl.float32)
        for g0 in range(g_begin, g_end, BLOCK_G):
            offs_g = g0 + tl.arange(0, BLOCK_G)
            g_mask = offs_g < g_end
            # Read once: leave L2 to x and the partial sums.
            word = tl.load(
                code_rows + offs_g[None, :], mask=n_mask[:, None] & g_mask[None, :], other=0,
                eviction_policy="evict_first",
            )  # fmt: skip
            w = decode_e8p_values(word.to(tl.int32), values_ptr)  # [BLOCK_N, BLOCK_G, 8]
            # Inputs past the split are 0, which also zeroes the masked codes' (finite) values.
            if ROWS == 1:
                x = tl.load(x_input + offs_g[:, None] * 8 + lane[None, :], mask=g_mask[:, None], other=0.0)
                acc += tl.reduce(w * x.to(tl.float32)[None, :, :], 2, tl.standard._sum_combine)
            else:
                offs_k = g0 * 8 + tl.arange(0, BLOCK_G * 8)
                x_mask = (offs_m < M)[:, None] & (offs_k < g_end * 8)[None, :]
                x = tl.load(x_input + offs_m[:, None] * stride_xm + offs_k[None, :], mask=x_mask, other=0.0)
                w = tl.reshape(w, (BLOCK_N, BLOCK_G * 8))
                acc = tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc)
        if ROWS == 1:
            part = tl.reduce(acc, 1, tl.standard._sum_combine)[None, :]
        else:
            part = acc
        y_mask = (offs_m < M)[:, None] & n_mask[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        if ATOMIC:
            sums = acc_ptr + offs_m[:, None] * N + offs_n[None, :]
            add_split(part, sums, y_ptrs, arrivals_ptr + pid_n, y_mask, n_splits)
        else:
            tl.store(y_ptrs, part.to(y_ptr.dtype.element_ty), mask=y_mask)


def e8p_matmul_ref(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> x·Ŵᵀ [..., N] in x's dtype, Ŵ = the decoded codes [N, K]."""
    return F.linear(x, e8p_decode_ref(codes, x.dtype))


def matmul_candidates(rows: int, n_codes: int, boundaries: Sequence[int]) -> list[dict[str, int]]:
    """Tiles worth timing (the first is the default): CUDA-core and tensor-core forms for one row,
    tensor cores for more; column blocks that never straddle two inputs' `boundaries`."""
    forms = [1, MAX_ROWS] if rows == 1 else [MAX_ROWS]
    candidates = []
    for form in forms:
        tiles = ((64, 16), (32, 16), (128, 8)) if form == 1 else ((64, 16), (32, 16))
        for block_n, block_g in tiles:
            if any(b % block_n for b in boundaries):
                continue
            for split in (16, 32, 8):
                split = max(1, min(split, n_codes // block_g))
                config = dict(ROWS=form, BLOCK_N=block_n, BLOCK_G=block_g, SPLIT_K=split, num_warps=4)
                if config not in candidates:
                    candidates.append(config)
    return candidates


def e8p_matmul_triton(
    x: torch.Tensor,
    codes: torch.Tensor,
    widths: Sequence[int] | None = None,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """The fused kernel: x [M <= 16, K] (or [M, I, K] with `widths`) fp16/bf16 -> y [M, N].
    `config` fixes the form, tile and split (one of `matmul_candidates`)."""
    n, n_codes = codes.shape
    widths = [n] if widths is None else list(widths)
    inputs = 1 if x.dim() == 2 else x.shape[1]
    rows, k = x.shape[0], x.shape[-1]
    if rows > MAX_ROWS or x.dtype not in (torch.float16, torch.bfloat16) or n_codes * 8 != k:
        need = f"at most {MAX_ROWS} rows of fp16/bf16 and K = 8·{n_codes}"
        raise ValueError(f"x: {tuple(x.shape)} {x.dtype}; need {need}")
    if len(widths) != inputs or sum(widths) != n or inputs > MAX_INPUTS:
        raise ValueError(
            f"widths: {widths} must give each of x's {inputs} inputs (<= 3) columns summing to {n}"
        )
    if x.stride(-1) != 1:
        x = x.contiguous()
    codes = codes.contiguous()
    boundaries = [sum(widths[: i + 1]) for i in range(inputs - 1)]
    ends = boundaries + [n] * (2 - len(boundaries))
    stride_xi = 0 if x.dim() == 2 else x.stride(1)
    values = e8p_values(x.device)
    dot_dtype = tl.float32 if interpreting() else (tl.float16 if x.dtype == torch.float16 else tl.bfloat16)

    def launch(cfg: dict[str, int]) -> torch.Tensor:
        cfg = dict(cfg)
        per_split = words_per_split(n_codes, cfg.pop("SPLIT_K"), cfg["BLOCK_G"])
        split = triton.cdiv(n_codes, per_split)
        blocks = triton.cdiv(n, cfg["BLOCK_N"])
        y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
        acc, arrivals = split_k_workspace(x.device, rows * n, blocks)
        launchable(_e8p_matmul_kernel)[(blocks, split)](
            x, codes, values, y, acc, arrivals, rows, n, n_codes, per_split, split, *ends,
            x.stride(0), stride_xi, codes.stride(0), y.stride(0),
            ATOMIC=split > 1, DOT_DTYPE=dot_dtype, **cfg, **dependent_launch(x.device),
        )  # fmt: skip
        return y

    if config is None:
        candidates = matmul_candidates(rows, n_codes, boundaries)
        if not candidates:
            raise ValueError(f"widths: {widths}; input boundaries must be multiples of 32 columns")
        key = ("e8p_matmul", rows == 1, n_codes, tuple(widths), x.dtype)
        config = fastest_config(key, candidates, launch, x.device)
    return launch(config)


def fused_supported(x: torch.Tensor, codes: torch.Tensor) -> bool:
    """Whether `e8p_matmul` runs the fused kernel for x [..., K]: Triton, <= 16 fp16/bf16 rows."""
    rows = x.numel() // x.shape[-1]
    return use_triton(x, codes) and rows <= MAX_ROWS and x.dtype in (torch.float16, torch.bfloat16)


def e8p_matmul(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> x·Ŵᵀ [..., N]: fused on CUDA for <= 16 fp16/bf16 rows, else decode + F.linear."""
    if fused_supported(x, codes):
        return e8p_matmul_triton(x.reshape(-1, x.shape[-1]), codes).view(*x.shape[:-1], codes.shape[0])
    return F.linear(x, e8p_decode(codes, x.dtype))


def e8p_matmul_grouped(x: torch.Tensor, codes: torch.Tensor, widths: Sequence[int]) -> torch.Tensor:
    """x [..., I, K] -> [..., N]: columns of input i (`widths[i]` of them, in order) read x[..., i, :]."""
    lead = x.shape[:-2]
    if fused_supported(x[..., 0, :], codes):
        y = e8p_matmul_triton(x.reshape(-1, *x.shape[-2:]), codes, widths)
        return y.view(*lead, codes.shape[0])
    parts = codes.split(list(widths))
    return torch.cat([F.linear(x[..., i, :], e8p_decode(part, x.dtype)) for i, part in enumerate(parts)], -1)
