"""Fused E8P decode + matmul for a few rows (decoding): y = x·Ŵᵀ, Ŵ decoded tile by tile in registers.

Layouts: x [..., K] fp16/bf16 with at most `MAX_ROWS` rows, codes int16 [N, K/8] (`gpu_kernels.e8p`);
y [..., N] in x's dtype. Each program owns BLOCK_N output columns and walks K in BLOCK_K steps:
load BLOCK_N × BLOCK_K/8 code words, decode them (`decode_e8p_tile`), and accumulate
x_tile·Ŵ_tileᵀ in fp32 with `tl.dot` (rows padded to 16). The dense Ŵ never exists in memory, so
a decode step reads 2 bits a weight. More rows, other dtypes and CPU tensors use decode + F.linear.

Status: correct, not yet fast: slower than decode + cuBLAS at LLaMA shapes (bench/quip_kernels.py),
because its N/BLOCK_N programs walk all of K serially, too few to fill the GPU's SMs; split-K is the
next step. `E8PLinear` therefore decodes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpu_kernels._dispatch import launchable, triton_available, use_triton
from gpu_kernels.e8p import cached_table, e8p_decode, e8p_decode_ref

MAX_ROWS = 16

if triton_available():
    import triton
    import triton.language as tl

    from gpu_kernels.e8p import decode_e8p_tile

    @triton.jit
    def _e8p_matmul_kernel(
        x_ptr, codes_ptr, table_ptr, y_ptr, M, N, K, stride_xm, stride_cn, stride_ym,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.full(
            (BLOCK_M, BLOCK_N), 0.0, tl.float32
        )  # a builtin (tl.zeros is not), so it also interprets
        for k0 in range(0, K, BLOCK_K):
            offs_g = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            code_mask = (offs_n < N)[:, None] & (offs_g < K // 8)[None, :]
            word = tl.load(codes_ptr + offs_n[:, None] * stride_cn + offs_g[None, :], mask=code_mask, other=0)
            w = decode_e8p_tile(word.to(tl.int32), table_ptr)  # [BLOCK_N, BLOCK_K] fp32
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x_mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]  # masked K also zeroes padded codes
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=x_mask, other=0.0)
            # fp32 operands (tf32 on tensor cores) are exact here: E8P values and fp16/bf16 inputs have
            # at most tf32's 10 mantissa bits. (A bf16 dot of the cast tile misbehaves in the interpreter.)
            acc = tl.dot(x.to(tl.float32), tl.trans(w), acc)
        y_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        tl.store(
            y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask
        )


def e8p_matmul_ref(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> x·Ŵᵀ [..., N] in x's dtype, Ŵ = the decoded codes [N, K]."""
    return F.linear(x, e8p_decode_ref(codes, x.dtype))


def e8p_matmul_triton(
    x: torch.Tensor, codes: torch.Tensor, config: dict[str, int] | None = None
) -> torch.Tensor:
    """The fused kernel; x [M <= 16, K] fp16/bf16 with unit column stride."""
    m, k = x.shape
    n = codes.shape[0]
    if m > MAX_ROWS or x.dtype not in (torch.float16, torch.bfloat16) or codes.shape[1] * 8 != k:
        need = f"at most {MAX_ROWS} rows of fp16/bf16 and K = 8·{codes.shape[1]}"
        raise ValueError(f"x: {tuple(x.shape)} {x.dtype}; need {need}")
    x, codes = x.contiguous(), codes.contiguous()
    config = config or {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4}
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n, config["BLOCK_N"]),)
    launchable(_e8p_matmul_kernel)[grid](
        x, codes, cached_table(x.device), y, m, n, k, x.stride(0), codes.stride(0), y.stride(0),
        BLOCK_M=16, BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"], num_warps=config["num_warps"],
    )  # fmt: skip
    return y


def e8p_matmul(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> x·Ŵᵀ [..., N]: fused on CUDA for <= 16 fp16/bf16 rows, else decode + F.linear."""
    rows = x.numel() // x.shape[-1]
    if use_triton(x, codes) and rows <= MAX_ROWS and x.dtype in (torch.float16, torch.bfloat16):
        return e8p_matmul_triton(x.reshape(rows, -1), codes).view(*x.shape[:-1], codes.shape[0])
    return F.linear(x, e8p_decode(codes, x.dtype))
