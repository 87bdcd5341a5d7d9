"""The decode kernel (x·Wᵀ for 1..16 rows from packed 2/4/8-bit codes) against the float64 reference.

Tolerance as for the fused matmul: fp32 accumulation, one rounding to fp16 at the end.
"""

import pytest
import torch

from gpu_kernels.gptq_gemv import gemv_candidates, gptq_gemv, gptq_gemv_ref
from gpu_kernels.gptq_matmul import gptq_matmul
from tests.gpu_kernels.conftest import random_gptq_layer
from tests.gpu_kernels.test_gptq_matmul import RTOL, relative_error


def buffers(layer) -> tuple:
    return layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(
    "shape",  # (in, out, group size, act-order): odd widths, a partial last word, per-channel scales
    [(100, 37, 32, True), (256, 72, 128, False), (130, 40, -1, False), (300, 50, 64, False)],
    ids=str,
)
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_gemv_matches_reference(device: torch.device, bits: int, shape: tuple, rows: int) -> None:
    layer = random_gptq_layer(*shape, bits=bits, device=device)
    x = torch.randn(rows, layer.in_features, device=device).half()
    got = gptq_gemv(x, *buffers(layer))
    want = gptq_gemv_ref(x.double(), *buffers(layer))
    assert got.dtype == torch.float16 and got.shape == want.shape
    assert relative_error(got, want) < RTOL


@pytest.mark.parametrize("config_index", [0, 1, -1])
def test_gemv_every_candidate_tile_and_split_gives_the_same_product(
    device: torch.device, config_index: int
) -> None:
    """Splits add partial sums with atomics; a split or tile edge inside a group must not double count."""
    layer = random_gptq_layer(512, 96, group_size=64, act_order=False, bits=4, device=device)
    x = torch.randn(2, 512, device=device).half()
    candidates = gemv_candidates(2, 512, 96, 4)
    config = (
        candidates[config_index] | {"SPLIT_K": 3, "BLOCK_W": 4, "BLOCK_N": 32}
        if config_index == -1
        else candidates[config_index]
    )
    got = gptq_gemv(x, *buffers(layer), config=config)
    want = gptq_gemv_ref(x.double(), *buffers(layer))
    assert relative_error(got, want) < RTOL


def test_gemv_is_what_gptq_matmul_runs_for_few_rows(device: torch.device) -> None:
    layer = random_gptq_layer(128, 64, group_size=32, act_order=False, bits=4, device=device)
    x = torch.randn(2, 3, 128, device=device).half()
    got = gptq_matmul(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 4)
    assert got.shape == (2, 3, 64)
    assert torch.equal(got, gptq_gemv(x, *buffers(layer)))


def test_gemv_rejects_what_it_cannot_compute(device: torch.device) -> None:
    layer = random_gptq_layer(64, 32, group_size=32, act_order=False, bits=4, device=device)
    with pytest.raises(ValueError, match="in_features=64"):
        gptq_gemv(torch.randn(1, 65, device=device).half(), *buffers(layer))
    with pytest.raises(ValueError, match="at most 16"):
        gptq_gemv(torch.randn(17, 64, device=device).half(), *buffers(layer))
    layer3 = random_gptq_layer(64, 32, group_size=32, act_order=False, bits=3, device=device)
    with pytest.raises(ValueError, match="bits"):
        gptq_gemv(torch.randn(1, 64, device=device).half(), *buffers(layer3))
