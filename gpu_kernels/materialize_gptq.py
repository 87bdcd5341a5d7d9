"""Materialize a GPTQ-packed weight into a dense [out_features, in_features] matrix.

Layout (AutoGPTQ / GPTQModel checkpoints, shared by every integer quantizer here):
- `qweight` int32 [in_features * bits / 32, out_features]: codes packed along the input dim as a
  little-endian bit stream, `bits` bits per code. For 3 bits a code can straddle two words
  (codes 10 and 21 of every 32), which is GPTQ's "three words hold 32 codes" layout.
- `qzeros` int32 [n_groups, out_features * bits / 32]: zero points packed the same way along the
  output dim. Format v1 stores `zero - 1` (`zero_offset=1`), format v2 stores `zero` (`zero_offset=0`).
- `scales` float16/bfloat16/float32 [n_groups, out_features].
- `g_idx` int32 [in_features]: the group of each input channel (act-order permutes it).

W[o, i] = scales[g, o] * (code[i, o] - zero[g, o]) with g = g_idx[i].
"""

import torch


def unpack_bits_ref(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Unpack `count` codes along dim 0 of an int32 bit stream [words, N] into int32 [count, N]."""
    words = packed.to(torch.int64) & 0xFFFFFFFF  # unsigned view of each 32-bit word
    positions = torch.arange(count, device=packed.device) * bits
    word, shift = positions // 32, positions % 32
    low = words[word] >> shift[:, None]
    # A code that straddles a word boundary takes its high bits from the next word.
    nxt = torch.clamp(word + 1, max=words.shape[0] - 1)
    high = words[nxt] << (32 - shift)[:, None]
    straddles = (shift + bits > 32)[:, None]
    codes = torch.where(straddles, low | high, low) & ((1 << bits) - 1)
    return codes.to(torch.int32)


def materialize_gptq_ref(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int = 1,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Dense W [out_features, in_features] in `dtype` from the packed GPTQ tensors."""
    in_features, out_features = g_idx.shape[0], scales.shape[1]
    codes = unpack_bits_ref(qweight, bits, in_features)  # [in, out]
    zeros = unpack_bits_ref(qzeros.T.contiguous(), bits, out_features).T + zero_offset  # [groups, out]
    g = g_idx.long()
    w = (codes - zeros[g]).to(torch.float32) * scales[g].to(torch.float32)  # [in, out]
    return w.T.contiguous().to(dtype)


def materialize_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int = 1,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Dense W [out_features, in_features]; Triton on CUDA, the reference elsewhere."""
    return materialize_gptq_ref(qweight, qzeros, scales, g_idx, bits, zero_offset, dtype)
