"""y = x·Wᵀ for a few rows (decode, M = 1..16) straight from GPTQ-packed 2/4/8-bit weights.

A decode matmul is a stream of packed words: every word is read once and each of its codes is
multiplied by one input value, so the kernel's job is to keep HBM busy and do as little per code
as possible. Per tile of `BLOCK_W` packed words × `BLOCK_N` output columns it:
- loads the words once (coalesced along the output dim, the contiguous one in GPTQ's layout);
- walks the 32/bits codes of each word with constant shifts, multiplying code j of word w by
  x[w·32/bits + j]: no reshape of the code tile, so no shared-memory shuffle as a tensor-core
  tile would need;
- when the tile lies in one quantization group (no act-order), applies scale and zero point once
  per column, not per code: Σₖ xₖ·s·(qₖ − z) = s·(Σₖ xₖ·qₖ − z·Σₖ xₖ).
The reduction over the input dim is split over `SPLIT_K` programs (fp32 atomics) so that even a
4096-column weight spreads over every SM. Tile sizes and the split are chosen per shape by timing
a few candidates once (`gpu_kernels._dispatch.fastest_config`).
"""

import torch

from gpu_kernels._dispatch import fastest_config, launchable, triton_available
from gpu_kernels.materialize_gptq import contiguous_group_size, materialize_gptq_ref

GEMV_BITS = (2, 4, 8)
GEMV_MAX_ROWS = 16


def gptq_gemv_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int = 1,
) -> torch.Tensor:
    """x [..., in] -> x·Wᵀ [..., out] with W materialized in float32, result in x's dtype."""
    w = materialize_gptq_ref(qweight, qzeros, scales, g_idx, bits, zero_offset, torch.float32)
    return (x.to(torch.float32) @ w.T).to(x.dtype)


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _gptq_gemv_kernel(
        x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, y_ptr,
        M, K, N, zero_offset, group_size, words_per_split,
        stride_xm, stride_ym, stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn,
        BITS: tl.constexpr, ONE_GROUP: tl.constexpr, ATOMIC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """Program (n, s): columns [n·BLOCK_N, (n+1)·BLOCK_N), packed words of split s, all M rows.

        Sums are tl.reduce with tl.sum's own combine function: tl.sum is a @triton.jit function,
        which the interpreter (CPU tests) cannot call from a kernel built before TRITON_INTERPRET
        was set, while tl.reduce is a builtin that the interpreter runs as one numpy sum.
        """
        PACK: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        pid_n, pid_s = tl.program_id(0), tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        n_mask, m_mask = offs_n < N, offs_m < M
        w_begin = pid_s * words_per_split
        w_end = tl.minimum(w_begin + words_per_split, (K + PACK - 1) // PACK)
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for w_start in range(w_begin, w_end, BLOCK_W):
            offs_w = w_start + tl.arange(0, BLOCK_W)
            w_mask = offs_w < w_end
            words = tl.load(
                qweight_ptr + offs_w[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                mask=w_mask[:, None] & n_mask[None, :], other=0,
            ).to(tl.uint32, bitcast=True)  # fmt: skip
            if ONE_GROUP:
                dot = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
                x_sum = tl.full((BLOCK_M,), 0.0, tl.float32)
                for j in tl.static_range(PACK):
                    k = offs_w * PACK + j
                    x = tl.load(
                        x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                        mask=m_mask[:, None] & (w_mask & (k < K))[None, :], other=0.0,
                    ).to(tl.float32)  # fmt: skip
                    codes = ((words >> (j * BITS)) & MASK).to(tl.float32)
                    dot += tl.reduce(x[:, :, None] * codes[None, :, :], 1, tl.standard._sum_combine)
                    x_sum += tl.reduce(x, 1, tl.standard._sum_combine)
                g = (w_start * PACK) // group_size
                zero_word = tl.load(
                    qzeros_ptr + g * stride_zg + (offs_n // PACK) * stride_zn, mask=n_mask, other=0
                )
                zeros = (
                    zero_word.to(tl.uint32, bitcast=True) >> ((offs_n % PACK) * BITS).to(tl.uint32)
                ) & MASK
                zeros = zeros.to(tl.float32) + zero_offset
                scales = tl.load(scales_ptr + g * stride_sg + offs_n * stride_sn, mask=n_mask, other=0.0)
                acc += scales.to(tl.float32)[None, :] * (dot - zeros[None, :] * x_sum[:, None])
            else:  # act-order: every input channel has its own group, so scale each code
                for j in tl.static_range(PACK):
                    k = offs_w * PACK + j
                    k_mask = w_mask & (k < K)
                    x = tl.load(
                        x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0,
                    ).to(tl.float32)  # fmt: skip
                    g = tl.load(g_idx_ptr + k, mask=k_mask, other=0)[:, None]
                    mask = k_mask[:, None] & n_mask[None, :]
                    zero_word = tl.load(
                        qzeros_ptr + g * stride_zg + (offs_n // PACK)[None, :] * stride_zn, mask=mask, other=0
                    )
                    zeros = (
                        zero_word.to(tl.uint32, bitcast=True)
                        >> ((offs_n % PACK) * BITS).to(tl.uint32)[None, :]
                    ) & MASK
                    scales = tl.load(
                        scales_ptr + g * stride_sg + offs_n[None, :] * stride_sn, mask=mask, other=0.0
                    )
                    codes = ((words >> (j * BITS)) & MASK).to(tl.float32)
                    w = (codes - (zeros.to(tl.float32) + zero_offset)) * scales.to(tl.float32)
                    acc += tl.reduce(x[:, :, None] * w[None, :, :], 1, tl.standard._sum_combine)
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        y_mask = m_mask[:, None] & n_mask[None, :]
        if ATOMIC:  # the reduction is split over programs: add this split's part
            tl.atomic_add(y_ptrs, acc, mask=y_mask)
        else:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def _block_m(rows: int) -> int:
    return max(1, triton.next_power_of_2(rows))


def gemv_candidates(rows: int, in_features: int, out_features: int, bits: int) -> list[dict[str, int]]:
    """Tile shapes and reduction splits worth timing for this shape (the first is the default).

    Register use grows with BLOCK_M·BLOCK_W·BLOCK_N (the product tile), so wider row blocks get
    narrower tiles. Per tile, the two splits whose grid comes closest to two programs per SM.
    """
    block_m = _block_m(rows)
    words = -(-in_features * bits // 32)
    tiles = (
        [(8, 128), (16, 64), (4, 256), (32, 32)] if block_m <= 2 else [(4, 128), (8, 64), (4, 64), (16, 32)]
    )
    waves = 264  # two programs per SM of an H200 (132 SMs); consumer cards have 82-84
    candidates = []
    for block_w, block_n in tiles:
        columns = -(-out_features // block_n)
        splits = [s for s in (1, 2, 4, 8, 16) if s == 1 or words // s >= 2 * block_w]
        for split in sorted(splits, key=lambda s: abs(columns * s - waves))[:2]:
            candidates.append(dict(BLOCK_W=block_w, BLOCK_N=block_n, SPLIT_K=split, num_warps=4))
    return candidates


def gptq_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int = 1,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """x [..., in] -> x·Wᵀ [..., out] in x's dtype, for at most GEMV_MAX_ROWS rows and 2/4/8 bits.

    `config` fixes the tile (BLOCK_W, BLOCK_N, SPLIT_K, num_warps); by default the fastest of
    `gemv_candidates` for this shape, timed on first use.
    """
    in_features, out_features = g_idx.shape[0], scales.shape[1]
    if bits not in GEMV_BITS:
        raise ValueError(f"bits: the decode kernel takes {GEMV_BITS}, not {bits}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x: last dim {x.shape[-1]} must be in_features={in_features}")
    x2 = x.reshape(-1, in_features)
    rows = x2.shape[0]
    if rows > GEMV_MAX_ROWS:
        raise ValueError(f"x: {rows} rows; the decode kernel takes at most {GEMV_MAX_ROWS}")
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    group_size = contiguous_group_size(g_idx, scales.shape[0])

    def launch(cfg: dict[str, int]) -> torch.Tensor:
        cfg = dict(cfg)
        split, block_w = cfg.pop("SPLIT_K"), cfg["BLOCK_W"]
        words = qweight.shape[0]
        words_per_split = triton.cdiv(triton.cdiv(words, split), block_w) * block_w
        split = triton.cdiv(words, words_per_split)
        one_group = group_size > 0 and (scales.shape[0] == 1 or group_size % (block_w * 32 // bits) == 0)
        y = (torch.zeros if split > 1 else torch.empty)(
            rows, out_features, dtype=torch.float32 if split > 1 else x.dtype, device=x.device
        )
        launchable(_gptq_gemv_kernel)[(triton.cdiv(out_features, cfg["BLOCK_N"]), split)](
            x2, qweight, qzeros, scales, g_idx, y,
            rows, in_features, out_features, zero_offset, max(group_size, 1), words_per_split,
            x2.stride(0), y.stride(0), *qweight.stride(), *qzeros.stride(), *scales.stride(),
            BITS=bits, ONE_GROUP=one_group, ATOMIC=split > 1, BLOCK_M=_block_m(rows), **cfg,
        )  # fmt: skip
        return y

    if config is None:
        key = ("gptq_gemv", _block_m(rows), in_features, out_features, bits, group_size > 0, x.dtype)
        config = fastest_config(key, gemv_candidates(rows, in_features, out_features, bits), launch, x.device)
    return launch(config).to(x.dtype).view(*x.shape[:-1], out_features)
