"""Flash-decoding attention over a static KV cache against its reference, and the reference itself."""

import math

import pytest
import torch
import torch.nn.functional as F

from gpu_kernels.decode_attention import (
    CHUNK,
    decode_attention,
    decode_attention_ref,
    decode_attention_triton,
)

TOLERANCES = {  # the kernel and the reference both work in fp32; they differ by the output's rounding
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def random_caches(
    rows: int,
    kv_heads: int,
    max_seq_len: int,
    head_dim: int,
    lengths: list[int],
    dtype: torch.dtype,
    device: torch.device,
    garbage: float = 1e4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V caches with random keys at positions below lengths[b] of rows b < len(lengths), and
    `garbage` everywhere else (later positions, rows past the batch) that attention must ignore."""
    k_cache = torch.full((rows, kv_heads, max_seq_len, head_dim), garbage, dtype=dtype)
    v_cache = torch.full((rows, kv_heads, max_seq_len, head_dim), -garbage, dtype=dtype)
    for b, length in enumerate(lengths):
        k_cache[b, :, :length] = torch.randn(kv_heads, length, head_dim, dtype=dtype)
        v_cache[b, :, :length] = torch.randn(kv_heads, length, head_dim, dtype=dtype)
    return k_cache.to(device), v_cache.to(device)


def test_reference_is_softmax_attention_over_each_rows_first_keys() -> None:
    """The oracle itself: per row and query head, SDPA over keys 0..length-1 of its kv head."""
    heads, kv_heads, head_dim, lengths = 4, 2, 8, [3, 1, 7]
    k_cache, v_cache = random_caches(4, kv_heads, 7, head_dim, lengths, torch.float32, torch.device("cpu"))
    q = torch.randn(3, heads, head_dim)
    got = decode_attention_ref(q, k_cache, v_cache, torch.tensor(lengths), 1 / math.sqrt(head_dim))
    for b, length in enumerate(lengths):
        for h in range(heads):
            kv = h // (heads // kv_heads)
            k, v = k_cache[b, kv, :length], v_cache[b, kv, :length]
            want = F.scaled_dot_product_attention(q[b, h][None], k, v)[0]
            torch.testing.assert_close(got[b, h], want, rtol=1e-5, atol=1e-5)


# A cache of 3·CHUNK + 8 positions (three full chunks and a part one); lengths of one key, either side
# of a chunk edge, the whole cache.
@pytest.mark.parametrize("lengths", [[1, 1], [CHUNK, CHUNK + 1], [3 * CHUNK + 8, 2 * CHUNK - 1]])
@pytest.mark.parametrize("lengths_dtype", [torch.int64, torch.int32])
def test_matches_reference_at_lengths_around_chunk_edges(
    device: torch.device, lengths: list[int], lengths_dtype: torch.dtype
) -> None:
    max_seq_len = 3 * CHUNK + 8
    k_cache, v_cache = random_caches(3, 2, max_seq_len, 16, lengths, torch.float32, device)
    q = torch.randn(2, 2, 16, device=device)
    lengths_t = torch.tensor(lengths, dtype=lengths_dtype, device=device)
    got = decode_attention(q, k_cache, v_cache, lengths_t, 0.25)
    want = decode_attention_ref(q, k_cache, v_cache, lengths_t, 0.25)
    assert got.shape == (2, 2, 16) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_grouped_query_heads_share_their_kv_head(device: torch.device, dtype: torch.dtype) -> None:
    """8 query heads on 2 kv heads: heads 0-3 read kv head 0, heads 4-7 kv head 1."""
    lengths = [CHUNK + 37, 5]
    k_cache, v_cache = random_caches(2, 2, 2 * CHUNK, 32, lengths, dtype, device)
    q = torch.randn(2, 8, 32, device=device).to(dtype)
    lengths_t = torch.tensor(lengths, device=device)
    got = decode_attention(q, k_cache, v_cache, lengths_t, 1 / math.sqrt(32))
    assert got.dtype == dtype
    torch.testing.assert_close(
        got, decode_attention_ref(q, k_cache, v_cache, lengths_t, 1 / math.sqrt(32)), **TOLERANCES[dtype]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reads_q_as_a_column_slice_of_a_fused_qkv_projection(
    device: torch.device, dtype: torch.dtype
) -> None:
    heads, kv_heads, head_dim = 4, 2, 16
    qkv = torch.randn(2, (heads + 2 * kv_heads) * head_dim, device=device).to(dtype)
    q = qkv[:, : heads * head_dim].view(2, heads, head_dim)
    lengths = [CHUNK, 2 * CHUNK]
    k_cache, v_cache = random_caches(2, kv_heads, 2 * CHUNK, head_dim, lengths, dtype, device)
    lengths_t = torch.tensor(lengths, device=device)
    got = decode_attention(q, k_cache, v_cache, lengths_t, 0.25)
    assert got.is_contiguous()
    torch.testing.assert_close(
        got, decode_attention_ref(q, k_cache, v_cache, lengths_t, 0.25), **TOLERANCES[dtype]
    )


def test_combines_more_chunks_than_one_combining_step_reads(device: torch.device) -> None:
    """Chunks of 4 keys in a 160-position cache: 40 chunks, more than COMBINE_BLOCK (32) at once."""
    lengths = [160, 129, 3]
    k_cache, v_cache = random_caches(3, 1, 160, 16, lengths, torch.float32, device)
    q = torch.randn(3, 2, 16, device=device)
    lengths_t = torch.tensor(lengths, device=device)
    got = decode_attention_triton(q, k_cache, v_cache, lengths_t, 0.25, chunk=4)
    torch.testing.assert_close(
        got, decode_attention_ref(q, k_cache, v_cache, lengths_t, 0.25), **TOLERANCES[torch.float32]
    )


def test_never_reads_the_cache_past_each_rows_length(device: torch.device) -> None:
    """NaN past the lengths would poison any sum that touched it; the result equals zeros there."""
    lengths = [CHUNK - 3, 1]
    k_nan, v_nan = random_caches(2, 2, 2 * CHUNK, 16, lengths, torch.float16, device, garbage=float("nan"))
    k_zero, v_zero = (c.nan_to_num(0.0) for c in (k_nan, v_nan))
    q = torch.randn(2, 2, 16, device=device).half()
    lengths_t = torch.tensor(lengths, device=device)
    got = decode_attention(q, k_nan, v_nan, lengths_t, 0.25)
    assert not got.isnan().any()
    torch.testing.assert_close(
        got, decode_attention_ref(q, k_zero, v_zero, lengths_t, 0.25), **TOLERANCES[torch.float16]
    )
