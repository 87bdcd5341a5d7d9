"""Materialize an NF4 weight (QLoRA / bitsandbytes layout) into a dense [out_features, in_features] matrix.

Layout:
- The weight is flattened row-major and cut into blocks of `block_size` (64) elements; the last
  block is zero-padded, so `n_blocks = ceil(out_features * in_features / block_size)`.
- `packed` uint8 [n_blocks * block_size / 2]: two 4-bit codes per byte, the first element of each
  pair in the high nibble (bitsandbytes' order).
- `absmax` float32 [n_blocks]: the absolute maximum of each block.

W.flatten()[k] = NF4_CODEBOOK[code[k]] * absmax[k // block_size].
"""

import torch

from gpu_kernels._dispatch import launchable, triton_available, use_triton

# QLoRA's NormalFloat4 levels (Dettmers et al. 2023, appendix E): quantiles of N(0, 1) scaled to
# [-1, 1], with an exact zero.
NF4_CODEBOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def unpack_nf4_ref(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [n/2] -> int64 codes [n], high nibble first."""
    high = (packed >> 4).long()
    low = (packed & 0xF).long()
    return torch.stack([high, low], dim=-1).flatten()


def materialize_nf4_ref(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    out_features: int,
    in_features: int,
    block_size: int = 64,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Dense W [out_features, in_features] in `dtype` from NF4 codes and per-block absmax."""
    codebook = torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=packed.device)
    values = codebook[unpack_nf4_ref(packed)].view(-1, block_size) * absmax.float()[:, None]
    return values.flatten()[: out_features * in_features].view(out_features, in_features).to(dtype)


def materialize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    out_features: int,
    in_features: int,
    block_size: int = 64,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Dense W [out_features, in_features]; Triton on CUDA, the reference elsewhere."""
    if use_triton(packed):
        return materialize_nf4_triton(packed, absmax, out_features, in_features, block_size, dtype)
    return materialize_nf4_ref(packed, absmax, out_features, in_features, block_size, dtype)


# --- Triton -------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _materialize_nf4_kernel(
        packed_ptr, absmax_ptr, codebook_ptr, out_ptr, n_elements,
        BLOCK_SIZE: tl.constexpr, BLOCK_BYTES: tl.constexpr,
    ):  # fmt: skip
        """Each program expands BLOCK_BYTES packed bytes into 2·BLOCK_BYTES contiguous outputs."""
        offs_b = tl.program_id(0) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
        byte = tl.load(packed_ptr + offs_b, mask=2 * offs_b < n_elements, other=0).to(tl.int32)
        scale = tl.load(absmax_ptr + (2 * offs_b) // BLOCK_SIZE, mask=2 * offs_b < n_elements, other=0.0)
        high = tl.load(codebook_ptr + (byte >> 4)) * scale  # the first element of each pair
        low = tl.load(codebook_ptr + (byte & 0xF)) * scale
        values = tl.reshape(tl.join(high, low), (2 * BLOCK_BYTES,))  # interleaved: high, low, high, ...
        offs = tl.program_id(0) * 2 * BLOCK_BYTES + tl.arange(0, 2 * BLOCK_BYTES)
        tl.store(out_ptr + offs, values.to(out_ptr.dtype.element_ty), mask=offs < n_elements)


_codebooks: dict[torch.device, torch.Tensor] = {}


def materialize_nf4_triton(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    out_features: int,
    in_features: int,
    block_size: int = 64,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """The Triton kernel behind `materialize_nf4` (same arguments and result)."""
    if block_size % 2:
        raise ValueError(f"block_size: {block_size} must be even (two codes per byte)")
    if packed.device not in _codebooks:
        _codebooks[packed.device] = torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=packed.device)
    n_elements = out_features * in_features
    out = torch.empty(out_features, in_features, dtype=dtype, device=packed.device)
    block_bytes = 1024  # 2048 outputs (4 KB at bf16) per program; the kernel is bandwidth-bound
    grid = (triton.cdiv(n_elements, 2 * block_bytes),)
    launchable(_materialize_nf4_kernel)[grid](
        packed.contiguous(), absmax.float().contiguous(), _codebooks[packed.device], out, n_elements,
        BLOCK_SIZE=block_size, BLOCK_BYTES=block_bytes, num_warps=4,
    )  # fmt: skip
    return out
