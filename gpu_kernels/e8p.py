"""E8P ("E8 padded") 2-bit codebook: decode 16-bit code words into 8 weights each.

Codebook. The abs grid holds 256 vectors of positive half-odd coordinates ({½, 3/2, 5/2}): the 227
absolute values of the D̂8 = D8 + ½ points with squared norm <= 10, padded with 29 vectors of
squared norm 12 (five 3/2 and three ½, chosen so every coordinate is 3/2 in 18 or 19 of them).
A D̂8 point has an even coordinate sum, so for each abs vector only the sign patterns of one
parity are valid: 128 of them. With a global ±¼ shift the codebook has 256·128·2 = 65,536 points,
a subset of E8 + ¼: 16 bits for 8 weights.

Code word (int16, read as 16 unsigned bits): bits 15..8 index the abs grid; bits 7..0 are sign
bits, bit j negating coordinate j. An even popcount of the sign bits means shift +¼; an odd one
means shift −¼ and bit 0 is flipped before use, so the signs applied always have even parity. The
stored table pre-negates coordinate 0 of the abs vectors with an odd coordinate sum; an even number
of sign flips then keeps every decoded point (minus its shift) in D̂8.

Layouts: `codes` int16 [rows, cols / 8], code (r, g) covering weights [r, 8g : 8g + 8]; the decoded
tile is [rows, cols]. Kernels read the signed grid itself, fp32 [256, 8] (8 KB, resident per device:
`e8p_values`): a decode is one gather of eight contiguous values per code, an XOR of each sign bit
into its value's sign bit and one add of the shift per weight, with no integer-to-float conversion
(a quarter-rate instruction on NVIDIA GPUs).
"""

from __future__ import annotations

import functools
import itertools

import torch

from gpu_kernels._dispatch import device_constant, fastest_config, launchable, triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl

    SIGN_BIT = tl.constexpr(-(2**31))  # 0x80000000 as an int32


##### The codebook #####


@functools.cache
def e8p_grid() -> torch.Tensor:
    """The 256 abs vectors [256, 8] float32 (positive), ordered by squared norm, then lexicographically."""
    small = [v for v in itertools.product((0.5, 1.5, 2.5), repeat=8) if sum(c * c for c in v) <= 10]
    small.sort(key=lambda v: (sum(c * c for c in v), v))
    # Pad with norm² 12 vectors (½ at three positions, 3/2 elsewhere), greedily balancing positions.
    use = [0] * 8
    padding = []
    candidates = list(itertools.combinations(range(8), 3))
    while len(padding) < 256 - len(small):
        best = min((c for c in candidates if c not in padding), key=lambda c: sorted(-use[i] for i in c))
        padding.append(best)
        for i in range(8):
            use[i] += i not in best
    padded = [tuple(0.5 if i in halves else 1.5 for i in range(8)) for halves in padding]
    return torch.tensor(small + padded, dtype=torch.float32)


@functools.cache
def e8p_signed_grid() -> torch.Tensor:
    """The abs grid with coordinate 0 negated where the coordinate sum is odd [256, 8] float32."""
    grid = e8p_grid().clone()
    odd = grid.sum(dim=1).remainder(2) == 1
    grid[odd, 0] *= -1
    return grid


def e8p_values(device: torch.device) -> torch.Tensor:
    """`e8p_signed_grid()` on `device` (fp32 [256, 8]), built once per device."""
    return device_constant("e8p_signed_grid", device, e8p_signed_grid)


##### Reference #####


def e8p_decode_ref(codes: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """codes int16 [rows, groups] -> weights [rows, groups·8] in `dtype` (codebook units)."""
    word = codes.to(torch.int32) & 0xFFFF
    index, signs = word >> 8, word & 0xFF
    parity = signs
    for shift in (4, 2, 1):
        parity = parity ^ (parity >> shift)
    parity = parity & 1
    signs = signs ^ parity  # odd popcount: flip bit 0, shift −¼
    bits = (signs[..., None] >> torch.arange(8, device=codes.device)) & 1
    values = e8p_values(codes.device)[index] * (1 - 2 * bits) + (0.25 - 0.5 * parity)[..., None]
    return values.reshape(codes.shape[0], -1).to(dtype)


##### Triton #####

if triton_available():

    @triton.jit
    def decode_e8p_values(word, values_ptr):
        """int32 code words [R, G] (16 low bits used) -> fp32 weights [R, G, 8]."""
        word = word & 0xFFFF
        signs = word & 0xFF
        parity = signs ^ (signs >> 4)
        parity = parity ^ (parity >> 2)
        parity = (parity ^ (parity >> 1)) & 1
        signs = signs ^ parity  # odd popcount: flip bit 0, shift −¼
        lane = tl.arange(0, 8)[None, None, :]
        grid = tl.load(values_ptr + (word >> 8)[:, :, None] * 8 + lane)  # [R, G, 8]: 8 contiguous values
        # Sign bit j of the code to bit 31 of value j (a shift and one three-input logic op).
        sign_bit = (signs[:, :, None] << (31 - lane)) & SIGN_BIT
        value = (grid.to(tl.int32, bitcast=True) ^ sign_bit).to(tl.float32, bitcast=True)
        return value + tl.where(parity == 1, -0.25, 0.25)[:, :, None]

    @triton.jit
    def decode_e8p_tile(word, values_ptr):
        """int32 code words [R, G] (16 low bits used) -> fp32 weights [R, G·8]."""
        value = decode_e8p_values(word, values_ptr)
        return tl.reshape(value, (value.shape[0], value.shape[1] * 8))

    @triton.jit
    def _e8p_decode_kernel(
        codes_ptr, values_ptr, out_ptr, rows, groups, stride_cm, stride_om,
        BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr,
    ):  # fmt: skip
        pid_m, pid_g = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
        mask = (offs_m < rows)[:, None] & (offs_g < groups)[None, :]
        word = tl.load(codes_ptr + offs_m[:, None] * stride_cm + offs_g[None, :], mask=mask, other=0)
        value = decode_e8p_tile(word.to(tl.int32), values_ptr)
        offs_k = pid_g * BLOCK_G * 8 + tl.arange(0, BLOCK_G * 8)
        out_mask = (offs_m < rows)[:, None] & (offs_k < groups * 8)[None, :]
        out = out_ptr + offs_m[:, None] * stride_om + offs_k[None, :]
        tl.store(out, value.to(out_ptr.dtype.element_ty), mask=out_mask)


DECODE_CANDIDATES = [  # BLOCK_M rows x BLOCK_G codes a program; the first is the default
    {"BLOCK_M": 8, "BLOCK_G": 128, "num_warps": 4},
    {"BLOCK_M": 16, "BLOCK_G": 64, "num_warps": 4},
    {"BLOCK_M": 32, "BLOCK_G": 32, "num_warps": 4},
    {"BLOCK_M": 32, "BLOCK_G": 64, "num_warps": 8},
]


def e8p_decode_triton(
    codes: torch.Tensor, dtype: torch.dtype = torch.float16, config: dict[str, int] | None = None
) -> torch.Tensor:
    """The Triton decode; `config` fixes the tile (one of `DECODE_CANDIDATES`; by default the
    fastest for this shape, timed on first use)."""
    codes = codes.contiguous()
    rows, groups = codes.shape
    values = e8p_values(codes.device)

    def launch(cfg: dict[str, int]) -> torch.Tensor:
        # Rows of fewer codes than the tile's (small models) take more rows a program instead.
        block_g = min(cfg["BLOCK_G"], 1 << (groups - 1).bit_length())
        cfg = dict(cfg, BLOCK_G=block_g, BLOCK_M=cfg["BLOCK_M"] * (cfg["BLOCK_G"] // block_g))
        out = torch.empty(rows, groups * 8, device=codes.device, dtype=dtype)
        grid = (triton.cdiv(rows, cfg["BLOCK_M"]), triton.cdiv(groups, block_g))
        launchable(_e8p_decode_kernel)[grid](
            codes, values, out, rows, groups, codes.stride(0), out.stride(0), **cfg
        )
        return out

    if config is None:
        config = fastest_config(("e8p_decode", rows, groups, dtype), DECODE_CANDIDATES, launch, codes.device)
    return launch(config)


def e8p_decode(codes: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """codes int16 [rows, groups] -> weights [rows, groups·8]; Triton on CUDA, the reference elsewhere."""
    if not use_triton(codes):
        return e8p_decode_ref(codes, dtype)
    return e8p_decode_triton(codes, dtype)
