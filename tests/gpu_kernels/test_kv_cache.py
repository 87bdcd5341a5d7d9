"""Rotary on q and k with the new keys and values written into the KV cache, against the reference."""

import pytest
import torch

from gpu_kernels.kv_cache import rotary_kv_write_, rotary_kv_write_ref_

HEAD_DIM = 16


def fused_qkv(
    batch: int, tokens: int, heads: int, kv_heads: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused projection output [batch, tokens, (heads + 2·kv_heads)·HEAD_DIM] and q, k, v as views of it."""
    qkv = torch.randn(batch, tokens, (heads + 2 * kv_heads) * HEAD_DIM, device=device).to(dtype)
    q, k, v = qkv.split([heads * HEAD_DIM, kv_heads * HEAD_DIM, kv_heads * HEAD_DIM], dim=-1)
    shape = (batch, tokens, -1, HEAD_DIM)
    return qkv, q.view(shape), k.view(shape), v.view(shape)


def rotary_tables(
    batch: int, tokens: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [batch, tokens, HEAD_DIM] as Hugging Face's rotary embedding returns them."""
    angles = torch.rand(batch, tokens, HEAD_DIM // 2, device=device) * 6
    angles = torch.cat([angles, angles], -1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def garbage_caches(
    rows: int, kv_heads: int, max_seq_len: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V caches of random values ~100, unlike any rotated key or value written into them."""
    shape = (rows, kv_heads, max_seq_len, HEAD_DIM)
    k_cache, v_cache = torch.randn(shape, device=device) * 100, torch.randn(shape, device=device) * 100
    return k_cache.to(dtype), v_cache.to(dtype)


@pytest.mark.parametrize(
    "dtype, cache_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),  # values cast to the cache's dtype
    ],
)
@pytest.mark.parametrize("tokens", [1, 3])  # decode, prefill
def test_rotates_q_and_writes_rotated_k_and_v_like_the_reference(
    device: torch.device, dtype: torch.dtype, cache_dtype: torch.dtype, tokens: int
) -> None:
    _, q, k, v = fused_qkv(2, tokens, 4, 2, dtype, device)
    cos, sin = rotary_tables(2, tokens, dtype, device)
    k_cache, v_cache = garbage_caches(3, 2, 8, cache_dtype, device)
    rows = torch.tensor([2, 0], device=device)
    positions = torch.tensor([[5, 6, 7][:tokens], [0, 1, 2][:tokens]], device=device)
    want_q, want_k_cache, want_v_cache = q.clone(), k_cache.clone(), v_cache.clone()
    rotary_kv_write_ref_(want_q, k, v, cos, sin, want_k_cache, want_v_cache, rows, positions)

    rotary_kv_write_(q, k, v, cos, sin, k_cache, v_cache, rows, positions)

    # The same products and sums rounded to the same dtype: bit for bit. Except bf16 under Triton's
    # interpreter, which truncates where the GPU (and PyTorch) round to nearest: one bf16 ulp apart.
    exact = dtype != torch.bfloat16 or device.type == "cuda"
    tolerance = dict(rtol=0, atol=0) if exact else dict(rtol=1.6e-2, atol=1.6e-2)
    torch.testing.assert_close(q, want_q, **tolerance)
    torch.testing.assert_close(k_cache, want_k_cache, **tolerance)
    assert torch.equal(v_cache, want_v_cache), "values are copied, not rounded"


def test_changes_only_the_addressed_cache_slots_and_leaves_k_and_v(device: torch.device) -> None:
    """6 query heads on 3 kv heads (not powers of two); two rows of a five-row cache."""
    qkv, q, k, v = fused_qkv(2, 2, 6, 3, torch.float32, device)
    cos, sin = rotary_tables(2, 2, torch.float32, device)
    k_cache, v_cache = garbage_caches(5, 3, 10, torch.float32, device)
    rows = torch.tensor([3, 1], device=device)
    positions = torch.tensor([[4, 9], [0, 4]], device=device)
    kv_before = qkv[..., 6 * HEAD_DIM :].clone()
    k_cache_before, v_cache_before = k_cache.clone(), v_cache.clone()

    rotary_kv_write_(q, k, v, cos, sin, k_cache, v_cache, rows, positions)

    addressed = torch.zeros(5, 10, dtype=torch.bool, device=device)
    addressed[rows[:, None], positions] = True
    changed = (k_cache != k_cache_before).any(-1).any(1) | (v_cache != v_cache_before).any(-1).any(1)
    assert torch.equal(changed, addressed), "exactly the (row, position) slots addressed are written"
    assert torch.equal(qkv[..., 6 * HEAD_DIM :], kv_before), "k and v are read, not rotated in place"
    for b in range(2):
        for t in range(2):
            torch.testing.assert_close(v_cache[rows[b], :, positions[b, t]], v[b, t], rtol=0, atol=0)
