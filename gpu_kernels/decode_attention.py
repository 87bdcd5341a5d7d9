"""Attention of one new query per batch row over a static KV cache (batch-1 decode), flash-decoding.

PyTorch's scaled_dot_product_attention with a boolean mask reads the whole cache of max_seq_len
positions for every step, and building the mask and reshaping the heads are launches of their own.
Here the keys are split into chunks of `CHUNK` positions: program (b, kv head, chunk) reads its
chunk of keys and values once for every query head of its GQA group and writes, per query head,
the chunk's softmax-weighted value mean and its log-sum-exp to an fp32 workspace; chunks past the
row's length load nothing. The last program of a (row, kv head) to finish its chunk combines them
(an arrival counter, as split-K does), so a call is one launch. The grid depends only on the shapes
and the lengths stay on the device, so the call can be captured in a CUDA graph and replayed as the
lengths grow. Scores and softmax are fp32 (scores = q·k·scale).
"""

import torch

from gpu_kernels._dispatch import (
    dependent_launch,
    launchable,
    split_k_workspace,
    triton_available,
    use_triton,
)

CHUNK = 64  # keys per program: [64, head_dim] tiles of K and V fit a 4-warp program's registers
COMBINE_BLOCK = 32  # chunks the combining program reads at a time (a longer cache takes more steps)


def decode_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [batch, heads, head_dim], caches [rows ≥ batch, kv_heads, max_seq_len, head_dim], lengths
    [batch] -> [batch, heads, head_dim] in q's dtype: row b attends to keys 0..lengths[b]-1 of cache
    row b (fp32 masked softmax; positions past the lengths must hold finite values)."""
    batch, heads, head_dim = q.shape
    kv_heads, max_seq_len = k_cache.shape[1], k_cache.shape[2]
    qg = q.to(torch.float32).reshape(batch, kv_heads, heads // kv_heads, head_dim)
    k, v = k_cache[:batch].to(torch.float32), v_cache[:batch].to(torch.float32)
    scores = torch.einsum("bkgd,bksd->bkgs", qg, k) * scale
    valid = torch.arange(max_seq_len, device=q.device) < lengths.view(batch, 1, 1, 1)
    weights = scores.masked_fill(~valid, float("-inf")).softmax(-1)
    return torch.einsum("bkgs,bksd->bkgd", weights, v).reshape(batch, heads, head_dim).to(q.dtype)


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention of q [batch, heads, head_dim] over the first lengths[b] positions of cache row b.

    heads must be a multiple of kv_heads (query head h reads kv head h // (heads // kv_heads)),
    lengths int32/int64 on q's device, each at least 1. Triton where it runs, for a power-of-two
    head_dim, q with a contiguous last dim (heads and rows of any stride: a view of a fused q/k/v
    projection) and contiguous caches [rows, kv_heads, max_seq_len, head_dim]; the reference
    elsewhere. The result is a new contiguous tensor in q's dtype.
    """
    head_dim = q.shape[-1]
    if (
        not use_triton(q, k_cache)
        or head_dim & (head_dim - 1)
        or q.stride(-1) != 1
        or not k_cache.is_contiguous()
        or not v_cache.is_contiguous()
    ):
        return decode_attention_ref(q, k_cache, v_cache, lengths, scale)
    return decode_attention_triton(q, k_cache, v_cache, lengths, scale)


if triton_available():
    import triton
    import triton.language as tl

    from gpu_kernels._pdl import wait_for_inputs

    # tl.reduce with our own combine functions rather than tl.sum / tl.max, whose standard-library
    # JIT functions Triton's interpreter cannot call from a kernel imported before it was enabled
    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def _max(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _combine_chunks(
        part_ptr, lse_ptr, out_ptr, first_slot, n_valid, HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr
    ):
        """out = the n_valid chunks' means from first_slot on, weighted by exp(lse − max lse), BLOCK_C
        chunks at a time with a running max. Loads skip L1: other programs wrote the chunks."""
        offs_d = tl.arange(0, HEAD_DIM)
        m_run = float("-inf")
        weight_sum = 0.0
        acc = tl.full((HEAD_DIM,), 0.0, tl.float32)  # a builtin (tl.zeros is not), so it also interprets
        for c0 in range(0, n_valid, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask = offs_c < n_valid
            lse = tl.load(lse_ptr + first_slot + offs_c, mask=mask, other=float("-inf"), cache_modifier=".cg")
            m_new = tl.maximum(m_run, tl.reduce(lse, 0, _max))
            rescale = tl.exp(m_run - m_new)  # 0 on the first block
            w = tl.exp(lse - m_new)  # 0 past the row's chunks
            parts = tl.load(
                part_ptr + (first_slot + offs_c[:, None]) * HEAD_DIM + offs_d[None, :],
                mask=mask[:, None],
                other=0.0,
                cache_modifier=".cg",
            )
            acc = acc * rescale + tl.reduce(w[:, None] * parts, 0, _add)
            weight_sum = weight_sum * rescale + tl.reduce(w, 0, _add)
            m_run = m_new
        tl.store(out_ptr + offs_d, (acc / weight_sum).to(out_ptr.dtype.element_ty))

    @triton.jit
    def _decode_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, lengths_ptr, part_ptr, lse_ptr, out_ptr, arrivals_ptr,
        max_seq_len, stride_qb, stride_qh, scale,
        GROUP: tl.constexpr, CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        """Program (b, kv head, c): keys [c·CHUNK, (c+1)·CHUNK) of row b for the GROUP query heads
        of the kv head. The K and V tiles are loaded once; each query head is a broadcast multiply
        and a sum over head_dim (a tl.dot would need 16 query rows, and without GQA there is one).
        Writes softmax(scores)·V over the chunk and the scores' log-sum-exp, per query head; the
        last of the row's chunks to arrive combines them into the output and resets the counter."""
        wait_for_inputs(PDL)
        b, kv_head, chunk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n_kv_heads, n_chunks = tl.num_programs(1), tl.num_programs(2)
        length = tl.minimum(tl.load(lengths_ptr + b).to(tl.int32), max_seq_len)
        start = chunk * CHUNK
        if start < length:  # chunks past the row's keys read and write nothing
            offs_s = start + tl.arange(0, CHUNK)
            offs_d = tl.arange(0, HEAD_DIM)
            valid = offs_s < length
            head_base = (b * n_kv_heads + kv_head).to(tl.int64) * max_seq_len
            offs = (head_base + offs_s[:, None]) * HEAD_DIM + offs_d[None, :]
            k = tl.load(k_cache_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)
            v = tl.load(v_cache_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)
            first_head_slot = (b * n_kv_heads * GROUP + kv_head * GROUP) * n_chunks
            for g in tl.static_range(GROUP):
                q = tl.load(q_ptr + b * stride_qb + (kv_head * GROUP + g) * stride_qh + offs_d).to(tl.float32)
                scores = tl.reduce(k * q[None, :], 1, _add) * scale
                scores = tl.where(valid, scores, float("-inf"))
                m = tl.reduce(scores, 0, _max)  # finite: the chunk holds at least one key
                p = tl.exp(scores - m)
                total = tl.reduce(p, 0, _add)
                part = tl.reduce(p[:, None] * v, 0, _add) / total
                slot = first_head_slot + g * n_chunks + chunk
                tl.store(part_ptr + slot * HEAD_DIM + offs_d, part)
                tl.store(lse_ptr + slot, m + tl.log(total))
            tl.debug_barrier()  # every thread's stores are issued before the program counts as arrived
            arrivals = arrivals_ptr + b * n_kv_heads + kv_head
            n_valid = (length + CHUNK - 1) // CHUNK
            if tl.atomic_add(arrivals, 1) == n_valid - 1:  # acquire-release: the others' chunks are visible
                for g in tl.static_range(GROUP):
                    head_slot = first_head_slot + g * n_chunks
                    out = out_ptr + ((b * n_kv_heads + kv_head) * GROUP + g) * HEAD_DIM
                    _combine_chunks(part_ptr, lse_ptr, out, head_slot, n_valid, HEAD_DIM, BLOCK_C)
                tl.atomic_xchg(arrivals, 0)


def decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """`decode_attention` in Triton; `chunk` (a power of two) lets tests cover many chunks in a short
    cache."""
    batch, heads, head_dim = q.shape
    kv_heads, max_seq_len = k_cache.shape[1], k_cache.shape[2]
    n_chunks = triton.cdiv(max_seq_len, chunk)
    part = torch.empty((batch, heads, n_chunks, head_dim), dtype=torch.float32, device=q.device)
    lse = torch.empty((batch, heads, n_chunks), dtype=torch.float32, device=q.device)
    out = torch.empty((batch, heads, head_dim), dtype=q.dtype, device=q.device)
    _, arrivals = split_k_workspace(q.device, 0, batch * kv_heads)
    launchable(_decode_attention_kernel)[(batch, kv_heads, n_chunks)](
        q, k_cache, v_cache, lengths, part, lse, out, arrivals, max_seq_len, q.stride(0), q.stride(1), scale,
        GROUP=heads // kv_heads, CHUNK=chunk, HEAD_DIM=head_dim,
        BLOCK_C=min(COMBINE_BLOCK, triton.next_power_of_2(n_chunks)), **dependent_launch(q.device),
    )  # fmt: skip
    return out
