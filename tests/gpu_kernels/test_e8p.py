"""E8P decode: the codebook's structure, decode equals the codebook lookup, Triton equals the reference."""

import pytest
import torch

from gpu_kernels import e8p_decode, e8p_decode_ref, e8p_grid, e8p_signed_grid, e8p_values
from gpu_kernels.e8p import DECODE_CANDIDATES, e8p_decode_triton


def codebook_from_definition() -> torch.Tensor:
    """All 65,536 points [65536, 8] built straight from the definition, indexed by code word.

    Code word c = (abs index << 8) | sign bits b; shift −¼ if popcount(b) is odd (bit 0 then flipped),
    else +¼; the applied signs always have the negative count's parity equal to the abs vector's sum.
    """
    grid = e8p_grid()
    word = torch.arange(65536)
    index, bits = word >> 8, (word[:, None] >> torch.arange(8)) & 1  # [65536], [65536, 8]
    odd = bits.sum(1) % 2
    negative = bits.clone()
    negative[:, 0] ^= odd ^ (grid.sum(1)[index].long() % 2)
    return grid[index] * (1 - 2 * negative) + torch.where(odd == 1, -0.25, 0.25)[:, None]


@pytest.fixture(scope="module")
def codebook() -> torch.Tensor:
    return codebook_from_definition()


def all_codes() -> torch.Tensor:
    return torch.arange(65536, dtype=torch.int32).to(torch.int16).view(-1, 1)  # int16 wraps above 32767


def test_grid_has_227_d8_norms_up_to_10_and_29_of_norm_12() -> None:
    grid = e8p_grid()
    norms = grid.pow(2).sum(1)
    assert grid.shape == (256, 8) and len({tuple(v) for v in grid.tolist()}) == 256
    assert (norms <= 10).sum() == 227 and (norms[227:] == 12).all()
    assert set(grid.unique().tolist()) == {0.5, 1.5, 2.5}


def test_codebook_points_are_distinct_and_lie_in_shifted_d8(codebook: torch.Tensor) -> None:
    assert len({tuple(p) for p in codebook.tolist()}) == 65536
    quarters = (codebook * 4).round().remainder(4)  # +¼ shift: every coordinate ≡ ¾ (mod 1)
    shift = torch.where((quarters == 3).all(1), 0.25, -0.25)
    assert ((quarters == 3).all(1) | (quarters == 1).all(1)).all()
    d8_hat = codebook - shift[:, None]
    assert ((d8_hat * 2).round().remainder(2) == 1).all() and (d8_hat.sum(1).remainder(2) == 0).all()


def test_decode_equals_codebook_lookup(codebook: torch.Tensor) -> None:
    decoded = e8p_decode_ref(all_codes(), torch.float32).view(-1, 8)
    torch.testing.assert_close(decoded, codebook, rtol=0, atol=0)
    codes = torch.randint(-(2**15), 2**15, (5, 12), dtype=torch.int16)
    lookup = codebook[codes.to(torch.int64) & 0xFFFF].view(5, 96)
    torch.testing.assert_close(e8p_decode_ref(codes, torch.float32), lookup, rtol=0, atol=0)


def test_values_table_is_the_signed_grid_resident_once_per_device() -> None:
    table = e8p_values(torch.device("cpu"))
    assert e8p_values(torch.device("cpu")) is table  # no host copy on later calls (issue 22)
    torch.testing.assert_close(table, e8p_signed_grid(), rtol=0, atol=0)
    odd = e8p_grid().sum(1).remainder(2) == 1
    assert (table[odd, 0] < 0).all() and (table[~odd] > 0).all()


def test_every_decode_tile_equals_reference(device: torch.device) -> None:
    codes = torch.randint(-(2**15), 2**15, (40, 136), dtype=torch.int16, device=device)
    want = e8p_decode_ref(codes.cpu(), torch.bfloat16)
    for config in DECODE_CANDIDATES:
        got = e8p_decode_triton(codes, torch.bfloat16, config)
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0, msg=str(config))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 24), (1, 72), (16, 64), (70, 130)], ids=str)
def test_triton_decode_equals_reference(
    device: torch.device, shape: tuple[int, int], dtype: torch.dtype
) -> None:
    codes = torch.randint(-(2**15), 2**15, shape, dtype=torch.int16, device=device)
    decoded = e8p_decode(codes, dtype)
    assert decoded.dtype == dtype and decoded.shape == (shape[0], shape[1] * 8)
    # Every E8P value (multiples of ¼ up to 2.75) is exact in fp16 and bf16.
    torch.testing.assert_close(decoded.cpu(), e8p_decode_ref(codes.cpu(), dtype), rtol=0, atol=0)
