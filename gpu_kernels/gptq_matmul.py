"""Y = X·Wᵀ (or dY·W) straight from GPTQ-packed weights: dequantize tiles in registers, tensor-core dot.

One kernel serves both regimes. For decode (M = 1..16 rows) it splits the reduction over extra
programs (split-K, fp32 atomics into a workspace that the last program per output tile reads,
writes out in x's dtype and zeroes) so that every SM streams packed weights, and each packed word is
read once. For training (many rows) it is a tiled GEMM whose B operand is dequantized per tile;
there materialize + cuBLAS is faster (the product is compute-bound and cuBLAS's bf16 GEMM runs at
its own rate, while this kernel dequantizes each weight tile again for every block of rows), so
`gptq_matmul` takes the fused kernel only for decode (`bench/kernels.py --sections training` times
both).

transpose=False: x [..., in_features]  -> x·Wᵀ [..., out_features]   (forward)
transpose=True:  x [..., out_features] -> x·W  [..., in_features]    (input gradient)
"""

import torch

from gpu_kernels._dispatch import (
    dependent_launch,
    launchable,
    split_k_workspace,
    triton_available,
    use_triton,
)
from gpu_kernels.gptq_gemv import gemv_supports, gptq_gemv
from gpu_kernels.materialize_gptq import contiguous_group_size, materialize_gptq, materialize_gptq_ref

# Rows up to which the fused kernel runs (decode). Above, materialize + cuBLAS: with many rows the
# product is compute-bound, materializing W is one streaming pass, and cuBLAS's GEMM outruns a
# GEMM that dequantizes every weight tile again for each block of rows.
DECODE_MAX_ROWS = 16
FUSED_MAX_ROWS = 16
# 3-bit codes straddle words, so the fused kernel pays per-code positions and loses to materialize
# + a bf16 product even at M <= 16.
FUSED_BITS = (2, 4, 8)
# Rows up to which the forward product takes the batch-1 decode kernel (`gptq_gemv`), which reads
# each packed word with fewer instructions per code than the tensor-core tile.
GEMV_MAX_ROWS = 1


def gptq_matmul_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int = 1,
    transpose: bool = False,
) -> torch.Tensor:
    """Materialize W [out, in] in x's dtype, then x·Wᵀ (or x·W when `transpose`)."""
    w = materialize_gptq_ref(qweight, qzeros, scales, g_idx, bits, zero_offset, x.dtype)
    return x @ w if transpose else x @ w.T


if triton_available():
    import triton
    import triton.language as tl

    from gpu_kernels._pdl import wait_for_inputs
    from gpu_kernels.gptq_gemv import add_split
    from gpu_kernels.materialize_gptq import dequant_gptq_tile

    @triton.jit
    def _gptq_matmul_kernel(
        x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, y_ptr, acc_ptr, arrivals_ptr,
        M, K, N, zero_offset, group_size, r_per_split, n_splits,
        stride_xm, stride_xr, stride_ym, stride_yc,
        stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn,
        BITS: tl.constexpr, ONE_GROUP: tl.constexpr, TRANSPOSE: tl.constexpr, SPLIT_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """y[m, c] = sum_r x[m, r]·B[r, c] with B = Wᵀ [K=in, N=out], or B = W [N, K] when TRANSPOSE.

        r is the reduction index, c the output column; program (m, c, s) reduces rows
        [s·r_per_split, (s+1)·r_per_split) of B.
        """
        wait_for_inputs(PDL)
        pid_m, pid_c, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        R = N if TRANSPOSE else K
        r_begin = pid_s * r_per_split
        r_end = tl.minimum(r_begin + r_per_split, R)
        acc = tl.full((BLOCK_M, BLOCK_C), 0.0, tl.float32)  # tl.full: a builtin, so it also interprets
        for r_start in range(r_begin, r_end, BLOCK_R):
            offs_r = r_start + tl.arange(0, BLOCK_R)
            x_mask = (offs_m[:, None] < M) & (offs_r[None, :] < r_end)
            x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_r[None, :] * stride_xr
            x = tl.load(x_ptrs, mask=x_mask, other=0.0)
            if TRANSPOSE:  # B[r = out, c = in]
                b = dequant_gptq_tile(
                    qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_c, offs_r, pid_c * BLOCK_C, K, N,
                    zero_offset, group_size,
                    stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn,
                    BITS, ONE_GROUP, True, BLOCK_C,
                )  # fmt: skip
            else:  # B[r = in, c = out]
                b = dequant_gptq_tile(
                    qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_r, offs_c, r_start, K, N,
                    zero_offset, group_size,
                    stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn,
                    BITS, ONE_GROUP, False, BLOCK_R,
                )  # fmt: skip
            b = tl.where(offs_r[:, None] < r_end, b, 0.0)  # the split's last tile may overlap the next split
            acc = tl.dot(x, b.to(x.dtype), acc)
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_c[None, :] * stride_yc
        y_mask = (offs_m[:, None] < M) & (offs_c[None, :] < (K if TRANSPOSE else N))
        if SPLIT_K == 1:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
        else:
            acc_ptrs = acc_ptr + offs_m[:, None] * stride_ym + offs_c[None, :] * stride_yc
            arrivals = arrivals_ptr + pid_m * tl.num_programs(1) + pid_c
            add_split(acc, acc_ptrs, y_ptrs, arrivals, y_mask, n_splits)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def matmul_config(
    rows: int, reduction: int, cols: int, device: torch.device, bits: int = 4
) -> dict[str, int]:
    """Tile sizes keyed on shape.

    Few rows (decode): 16-row tiles and a split of the reduction so that the grid covers every SM
    about four times over; the kernel is bandwidth-bound and each packed word is read once.
    Many rows: 128x128 output tiles, 64-deep reduction steps (a GPTQ group of 128 spans two steps).
    Three pipeline stages fit the 228 KB of shared memory of an H100/H200 and the 100 KB of an
    RTX 3090/4090/A6000 at 2/4/8 bits; 3-bit tiles load two words per code (straddles), so they
    take two stages and, for decode, half the reduction depth (measured: three stages of 16x64x128
    ask for 360 KB).
    """
    stages = 2 if bits == 3 else 3
    if rows <= DECODE_MAX_ROWS:
        block_c, block_r = 64, 64 if bits == 3 else 128
        tiles = -(-cols // block_c)
        split = max(1, min(4 * _num_sms(device) // tiles, reduction // (4 * block_r)))
        return dict(
            BLOCK_M=16, BLOCK_C=block_c, BLOCK_R=block_r, SPLIT_K=split, num_warps=4, num_stages=stages
        )
    if rows <= 64:
        return dict(BLOCK_M=64, BLOCK_C=128, BLOCK_R=64, SPLIT_K=1, num_warps=4, num_stages=stages)
    return dict(BLOCK_M=128, BLOCK_C=128, BLOCK_R=64, SPLIT_K=1, num_warps=8, num_stages=stages)


def gptq_matmul_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int = 1,
    transpose: bool = False,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """The fused kernel for any number of rows (same arguments and result as `gptq_matmul`)."""
    in_features, out_features = g_idx.shape[0], scales.shape[1]
    reduction, cols = (out_features, in_features) if transpose else (in_features, out_features)
    if x.shape[-1] != reduction:
        side = "out" if transpose else "in"
        raise ValueError(f"x: last dim {x.shape[-1]} must be {side}_features={reduction}")
    x2 = x.reshape(-1, reduction)
    rows = x2.shape[0]
    cfg = dict(config or matmul_config(rows, reduction, cols, x.device, bits))
    split = cfg.pop("SPLIT_K")
    group_size = contiguous_group_size(g_idx, scales.shape[0])
    tile_in = cfg["BLOCK_C"] if transpose else cfg["BLOCK_R"]
    one_group = group_size > 0 and (scales.shape[0] == 1 or group_size % tile_in == 0)
    r_per_split = triton.cdiv(triton.cdiv(reduction, split), cfg["BLOCK_R"]) * cfg["BLOCK_R"]
    split = triton.cdiv(reduction, r_per_split)
    y = torch.empty(rows, cols, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(rows, cfg["BLOCK_M"]), triton.cdiv(cols, cfg["BLOCK_C"]), split)
    acc, arrivals = split_k_workspace(x.device, rows * cols, grid[0] * grid[1])
    launchable(_gptq_matmul_kernel)[grid](
        x2, qweight, qzeros, scales, g_idx, y, acc, arrivals,
        rows, in_features, out_features, zero_offset, max(group_size, 1), r_per_split, split,
        *x2.stride(), *y.stride(), *qweight.stride(), *qzeros.stride(), *scales.stride(),
        BITS=bits, ONE_GROUP=one_group, TRANSPOSE=transpose, SPLIT_K=split, **cfg,
        **dependent_launch(x.device),
    )  # fmt: skip
    return y.view(*x.shape[:-1], cols)


def gptq_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int = 1,
    transpose: bool = False,
) -> torch.Tensor:
    """x·Wᵀ ([..., in] -> [..., out]) or, with `transpose`, x·W ([..., out] -> [..., in]), in x's dtype.

    CUDA: the batch-1 decode kernel up to GEMV_MAX_ROWS rows (forward, contiguous groups), the fused
    tile kernel up to FUSED_MAX_ROWS rows at 2/4/8 bits, else the Triton materialize + cuBLAS.
    Elsewhere: the PyTorch reference.
    """
    if not use_triton(x, qweight):
        return gptq_matmul_ref(x, qweight, qzeros, scales, g_idx, bits, zero_offset, transpose)
    rows = x.numel() // x.shape[-1]
    if rows <= GEMV_MAX_ROWS and not transpose and gemv_supports(bits, g_idx, scales):
        return gptq_gemv(x, qweight, qzeros, scales, g_idx, bits, zero_offset)
    if bits in FUSED_BITS and rows <= FUSED_MAX_ROWS:
        return gptq_matmul_triton(x, qweight, qzeros, scales, g_idx, bits, zero_offset, transpose)
    w = materialize_gptq(qweight, qzeros, scales, g_idx, bits, zero_offset, x.dtype)
    return x @ w if transpose else x @ w.T
