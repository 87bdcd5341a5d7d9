"""Rotary on q and k, and the new keys and values written into a static KV cache, in one launch.

A decode step otherwise rotates q and k (one launch each) and writes k and v into the cache with a
scatter each: four launches over a few kilobytes. Here program (b, t) rotates every query head of
token t of row b in place and writes every rotated key head and value head of that token to cache
row rows[b], position positions[b, t]. Rounding follows `gpu_kernels.rotary`: cos and sin in the
tensor's dtype (as Hugging Face's rotary embedding returns them), both products rounded to it,
then their sum; the key is then cast to the cache's dtype.
"""

import torch

from gpu_kernels._dispatch import dependent_launch, launchable, triton_available, use_triton
from gpu_kernels.rotary import apply_rotary_ref


def rotary_kv_write_ref_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """`rotary_kv_write_` in PyTorch: rotate q in place, store rotated k and v in the caches."""
    q.copy_(apply_rotary_ref(q, cos.to(q.dtype), sin.to(q.dtype)))
    k_rotated = apply_rotary_ref(k, cos.to(k.dtype), sin.to(k.dtype))
    # rows[:, None] and positions broadcast to [batch, tokens]; the indexed dims come first in the
    # slots addressed: [batch, tokens, kv_heads, head_dim], as k and v are
    k_cache[rows[:, None], :, positions] = k_rotated.to(k_cache.dtype)
    v_cache[rows[:, None], :, positions] = v.to(v_cache.dtype)


def rotary_kv_write_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """Rotate q [batch, tokens, heads, head_dim] in place; write k rotated and v [batch, tokens,
    kv_heads, head_dim] to k_cache / v_cache [rows_total, kv_heads, max_seq_len, head_dim] at
    [rows[b], :, positions[b, t]]. k and v are left as they were.

    q, k and v may be views of one fused projection output (any batch, token and head strides) with
    a contiguous last dim; cos and sin [batch, tokens, head_dim] likewise; the caches contiguous;
    rows [batch] and positions [batch, tokens] integer tensors on the device, each position below
    max_seq_len (nothing checks it on the device). Triton where it runs and head_dim is a power of
    two, the reference elsewhere.
    """
    batch, tokens, heads, head_dim = q.shape
    kv_heads, max_seq_len = k_cache.shape[1], k_cache.shape[2]
    if (
        not use_triton(q, k_cache)
        or head_dim & (head_dim - 1)
        or any(t.stride(-1) != 1 for t in (q, k, v, cos, sin))
        or not k_cache.is_contiguous()
        or not v_cache.is_contiguous()
    ):
        rotary_kv_write_ref_(q, k, v, cos, sin, k_cache, v_cache, rows, positions)
        return
    launchable(_rotary_kv_write_kernel)[(batch * tokens,)](
        q, k, v, cos, sin, k_cache, v_cache, rows, positions,
        tokens, heads, kv_heads, max_seq_len,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *cos.stride()[:2], *sin.stride()[:2],
        rows.stride(0), *positions.stride(),
        HALF=head_dim // 2, BLOCK_H=triton.next_power_of_2(heads), BLOCK_KV=triton.next_power_of_2(kv_heads),
        enable_fp_fusion=False,  # in fp32 a fused multiply-add would skip the products' rounding
        **dependent_launch(q.device),
    )  # fmt: skip


if triton_available():
    import triton
    import triton.language as tl

    from gpu_kernels._pdl import wait_for_inputs

    @triton.jit
    def _rotate(x1, x2, c1, c2, s1, s2):
        """The two halves of x·cos + rotate_half(x)·sin, each product rounded to x's dtype, then the sum.

        The products are fp32 products of values in x's dtype, rounded: exact before the rounding
        (fp16 and bf16 significands fit fp32's), so they round as products in x's dtype do. It
        keeps the arithmetic fp32, which Triton's interpreter needs (its bf16 arithmetic is wrong).
        """
        dtype = x1.dtype
        x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
        c1, c2 = c1.to(dtype).to(tl.float32), c2.to(dtype).to(tl.float32)
        s1, s2 = s1.to(dtype).to(tl.float32), s2.to(dtype).to(tl.float32)
        out1 = (x1 * c1).to(dtype).to(tl.float32) + (-x2 * s1).to(dtype).to(tl.float32)
        out2 = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
        return out1.to(dtype), out2.to(dtype)

    @triton.jit
    def _rotary_kv_write_kernel(
        q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, rows_ptr, positions_ptr,
        tokens, heads, kv_heads, max_seq_len,
        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        stride_cb, stride_ct, stride_sb, stride_st, stride_r, stride_pb, stride_pt,
        HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KV: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """Program b·tokens + t: every q, k and v head of token t of row b; x1/x2 are each head's halves."""
        wait_for_inputs(PDL)
        pid = tl.program_id(0)
        b, t = pid // tokens, pid % tokens
        offs_d = tl.arange(0, HALF)[None, :]
        cos_row = cos_ptr + b * stride_cb + t * stride_ct + offs_d
        sin_row = sin_ptr + b * stride_sb + t * stride_st + offs_d
        c1, c2 = tl.load(cos_row), tl.load(cos_row + HALF)
        s1, s2 = tl.load(sin_row), tl.load(sin_row + HALF)

        offs_h = tl.arange(0, BLOCK_H)[:, None]
        q_mask = offs_h < heads
        q_ptrs = q_ptr + b * stride_qb + t * stride_qt + offs_h * stride_qh + offs_d
        q1, q2 = _rotate(
            tl.load(q_ptrs, mask=q_mask, other=0.0), tl.load(q_ptrs + HALF, mask=q_mask, other=0.0),
            c1, c2, s1, s2,
        )  # fmt: skip
        tl.store(q_ptrs, q1, mask=q_mask)
        tl.store(q_ptrs + HALF, q2, mask=q_mask)

        offs_kv = tl.arange(0, BLOCK_KV)[:, None]
        kv_mask = offs_kv < kv_heads
        row = tl.load(rows_ptr + b * stride_r).to(tl.int64)
        position = tl.load(positions_ptr + b * stride_pb + t * stride_pt).to(tl.int64)
        slot = ((row * kv_heads + offs_kv) * max_seq_len + position) * (2 * HALF) + offs_d
        k_ptrs = k_ptr + b * stride_kb + t * stride_kt + offs_kv * stride_kh + offs_d
        k1, k2 = _rotate(
            tl.load(k_ptrs, mask=kv_mask, other=0.0), tl.load(k_ptrs + HALF, mask=kv_mask, other=0.0),
            c1, c2, s1, s2,
        )  # fmt: skip
        cache_dtype = k_cache_ptr.dtype.element_ty
        tl.store(k_cache_ptr + slot, k1.to(cache_dtype), mask=kv_mask)
        tl.store(k_cache_ptr + slot + HALF, k2.to(cache_dtype), mask=kv_mask)

        v_ptrs = v_ptr + b * stride_vb + t * stride_vt + offs_kv * stride_vh + offs_d
        v1, v2 = tl.load(v_ptrs, mask=kv_mask, other=0.0), tl.load(v_ptrs + HALF, mask=kv_mask, other=0.0)
        v_dtype = v_cache_ptr.dtype.element_ty
        tl.store(v_cache_ptr + slot, v1.to(v_dtype), mask=kv_mask)
        tl.store(v_cache_ptr + slot + HALF, v2.to(v_dtype), mask=kv_mask)
