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

from gpu_kernels._dispatch import launchable, triton_available, use_triton

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
    if use_triton(qs):
        return materialize_gguf_triton(qs, scales, mins, qtype, dtype)
    return materialize_gguf_ref(qs, scales, mins, qtype, dtype)


# --- Triton -------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _materialize_gguf_kernel(
        qs_ptr, scales_ptr, mins_ptr, out_ptr, n_blocks,
        QTYPE: tl.constexpr, BLOCKS: tl.constexpr,
    ):  # fmt: skip
        """Each program expands BLOCKS consecutive 32-element blocks (rows are whole blocks, so the
        flattened tensors line up block for block). QTYPE: 0 = Q4_0, 1 = Q4_1, 2 = Q8_0."""
        offs_blk = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
        blk_mask = offs_blk < n_blocks
        d = tl.load(scales_ptr + offs_blk, mask=blk_mask, other=0.0).to(tl.float32)[:, None]
        if QTYPE == 2:
            offs = offs_blk[:, None] * 32 + tl.arange(0, 32)[None, :]  # [BLOCKS, 32]
            q = tl.load(qs_ptr + offs, mask=blk_mask[:, None], other=0).to(tl.float32)
            w = d * q
        else:
            offs_byte = offs_blk[:, None] * 16 + tl.arange(0, 16)[None, :]  # [BLOCKS, 16]
            byte = tl.load(qs_ptr + offs_byte, mask=blk_mask[:, None], other=0).to(tl.int32)
            # Element j of a block is byte j's low nibble, element j + 16 its high nibble.
            q = tl.reshape(tl.permute(tl.join(byte & 0xF, byte >> 4), (0, 2, 1)), (BLOCKS, 32)).to(tl.float32)
            if QTYPE == 0:
                w = d * (q - 8.0)
            else:
                m = tl.load(mins_ptr + offs_blk, mask=blk_mask, other=0.0).to(tl.float32)[:, None]
                w = d * q + m
            offs = offs_blk[:, None] * 32 + tl.arange(0, 32)[None, :]
        tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=blk_mask[:, None])


def materialize_gguf_triton(
    qs: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    qtype: str,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """The Triton kernel behind `materialize_gguf` (same arguments and result)."""
    if qtype not in GGUF_QTYPES:
        raise ValueError(f"qtype: {qtype!r} is not one of {GGUF_QTYPES}")
    if qtype == "q4_1" and mins is None:
        raise ValueError("mins: Q4_1 needs the block minimums")
    rows, n_blocks = scales.shape[0], scales.numel()
    out = torch.empty(rows, n_blocks // rows * GGUF_BLOCK, dtype=dtype, device=qs.device)
    blocks = 64  # 2048 outputs per program
    scales = scales.contiguous()
    launchable(_materialize_gguf_kernel)[(triton.cdiv(n_blocks, blocks),)](
        qs.contiguous(), scales, scales if mins is None else mins.contiguous(), out, n_blocks,
        QTYPE=GGUF_QTYPES.index(qtype), BLOCKS=blocks, num_warps=4,
    )  # fmt: skip
    return out
