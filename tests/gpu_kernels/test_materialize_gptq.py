"""The Triton GPTQ materialize kernel reproduces `materialize_gptq_ref` bit for bit."""

import pytest
import torch

from gpu_kernels.materialize_gptq import (
    MATERIALIZE_TILES,
    materialize_gptq,
    materialize_gptq_ref,
    materialize_gptq_triton,
)
from tests.gpu_kernels.conftest import random_gptq_layer

# (in, out, group_size, act_order): non-multiples of the 64x128 tile, groups that split tiles
# (32) and span them (128), one group per channel (-1), act-order permutations.
SHAPES = [
    (96, 40, 32, False),
    (100, 37, 32, True),
    (70, 33, -1, False),
    (256, 136, 128, False),
    (192, 24, 64, True),
]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_materialize_gptq_matches_reference_exactly(device: torch.device, bits: int, shape: tuple) -> None:
    layer = random_gptq_layer(*shape, bits=bits, device=device)
    buffers = layer.qweight, layer.qzeros, layer.scales, layer.g_idx
    got = materialize_gptq_triton(*buffers, bits, 1, torch.float32)
    want = materialize_gptq_ref(*buffers, bits, 1, torch.float32)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("tile", MATERIALIZE_TILES, ids=str)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [64, 256], ids=["groups split tiles", "tiles in one group"])
def test_every_tile_the_shape_picker_may_choose_gives_the_same_weight(
    device: torch.device, tile: tuple, bits: int, group_size: int
) -> None:
    """Tiles inside one group expand whole 32-code units; tiles that cross groups gather per element."""
    layer = random_gptq_layer(320, 72, group_size, False, bits=bits, device=device)
    buffers = layer.qweight, layer.qzeros, layer.scales, layer.g_idx
    config = dict(BLOCK_K=tile[0], BLOCK_N=tile[1], num_warps=tile[2])
    got = materialize_gptq_triton(*buffers, bits, 1, torch.float32, config)
    torch.testing.assert_close(got, materialize_gptq_ref(*buffers, bits, 1, torch.float32), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_materialize_gptq_rounds_like_reference_in_half_dtypes(
    device: torch.device, dtype: torch.dtype
) -> None:
    layer = random_gptq_layer(130, 50, bits=3, group_size=32, act_order=True, device=device)
    buffers = layer.qweight, layer.qzeros, layer.scales, layer.g_idx
    torch.testing.assert_close(
        materialize_gptq_triton(*buffers, 3, 1, dtype), materialize_gptq_ref(*buffers, 3, 1, dtype)
    )


def test_materialize_gptq_reads_zero_format_v2(device: torch.device) -> None:
    layer = random_gptq_layer(64, 32, bits=4, group_size=32, act_order=False, device=device)
    buffers = layer.qweight, layer.qzeros, layer.scales, layer.g_idx
    got = materialize_gptq_triton(*buffers, 4, 0, torch.float32)
    torch.testing.assert_close(got, materialize_gptq_ref(*buffers, 4, 0, torch.float32), rtol=0, atol=0)


def test_materialize_gptq_dispatches_to_triton_under_interpreter(device: torch.device) -> None:
    """The public function takes the kernel whenever Triton can run (here, or on CUDA)."""
    layer = random_gptq_layer(64, 40, bits=2, group_size=64, act_order=False, device=device)
    buffers = layer.qweight, layer.qzeros, layer.scales, layer.g_idx
    torch.testing.assert_close(
        materialize_gptq(*buffers, 2, 1, torch.float32), layer.materialize(torch.float32)
    )


def test_materialize_gptq_sees_in_place_change_of_g_idx(device: torch.device) -> None:
    """The cached 'groups are contiguous' answer is recomputed after g_idx is modified in place."""
    layer = random_gptq_layer(128, 32, bits=4, group_size=64, act_order=False, device=device)
    buffers = layer.qweight, layer.qzeros, layer.scales, layer.g_idx
    materialize_gptq_triton(*buffers, 4, 1, torch.float32)
    layer.g_idx.copy_(layer.g_idx.flip(0))
    got = materialize_gptq_triton(*buffers, 4, 1, torch.float32)
    torch.testing.assert_close(got, materialize_gptq_ref(*buffers, 4, 1, torch.float32), rtol=0, atol=0)
