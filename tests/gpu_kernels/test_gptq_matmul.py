"""The fused GPTQ matmul (decode and training tiles, forward and transposed) against the reference.

Tolerance: the kernel accumulates in fp32 and rounds once to fp16, so its relative error to the
float64 reference is a few 1e-4 (fp16 has a 2^-11 ulp); we allow 2e-3.
"""

import pytest
import torch

from gpu_kernels.gptq_matmul import gptq_matmul, gptq_matmul_ref, gptq_matmul_triton
from tests.gpu_kernels.conftest import random_gptq_layer

RTOL = 2e-3


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def run(
    layer, x: torch.Tensor, transpose: bool, config: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    buffers = layer.qweight, layer.qzeros, layer.scales, layer.g_idx
    got = gptq_matmul_triton(x, *buffers, layer.bits, 1, transpose, config)
    want = gptq_matmul_ref(x.double(), *buffers, layer.bits, 1, transpose)
    return got, want


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(100, 37, 32, True), (256, 72, 128, False), (130, 40, -1, False)], ids=str)
@pytest.mark.parametrize("rows", [1, 5, 70])
@pytest.mark.parametrize("transpose", [False, True], ids=["forward", "transposed"])
def test_gptq_matmul_matches_reference(
    device: torch.device, bits: int, shape: tuple, rows: int, transpose: bool
) -> None:
    layer = random_gptq_layer(*shape, bits=bits, device=device)
    x = torch.randn(rows, layer.out_features if transpose else layer.in_features, device=device).half()
    got, want = run(layer, x, transpose)
    assert got.dtype == torch.float16 and got.shape == want.shape
    assert relative_error(got, want) < RTOL


@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("transpose", [False, True], ids=["forward", "transposed"])
def test_gptq_matmul_split_k_sums_all_splits(device: torch.device, split: int, transpose: bool) -> None:
    """Split-K (decode) adds partial sums with atomics; a split edge inside a tile must not double count."""
    layer = random_gptq_layer(200, 48, bits=3, group_size=32, act_order=True, device=device)
    x = torch.randn(3, 48 if transpose else 200, device=device).half()
    config = dict(BLOCK_M=16, BLOCK_C=32, BLOCK_R=32, SPLIT_K=split, num_warps=4, num_stages=2)
    got, want = run(layer, x, transpose, config)
    assert relative_error(got, want) < RTOL


def test_gptq_matmul_keeps_leading_dims_and_bfloat16(device: torch.device) -> None:
    if device.type == "cpu":
        pytest.skip("Triton's interpreter computes bf16 dots wrongly (numpy has no bf16); checked on CUDA")
    layer = random_gptq_layer(64, 48, bits=4, group_size=32, act_order=False, device=device)
    x = torch.randn(2, 3, 64, device=device).bfloat16()
    got, want = run(layer, x, transpose=False)
    assert got.shape == (2, 3, 48) and got.dtype == torch.bfloat16
    assert relative_error(got, want) < 1e-2  # bf16 operands: 2^-8 ulp


def test_gptq_matmul_rejects_wrong_input_width(device: torch.device) -> None:
    layer = random_gptq_layer(64, 48, bits=4, group_size=32, act_order=False, device=device)
    with pytest.raises(ValueError, match="in_features=64"):
        gptq_matmul_triton(torch.randn(2, 48, device=device).half(), layer.qweight, layer.qzeros,
                           layer.scales, layer.g_idx, 4)  # fmt: skip


@pytest.mark.parametrize("bits", [2, 3])  # 2 bits: fused up to 16 rows; 3 bits: always materialize
@pytest.mark.parametrize("rows", [4, 40])
def test_gptq_matmul_public_function_equals_layer_product(device: torch.device, rows: int, bits: int) -> None:
    """Whatever path the dispatcher picks (fused for few rows, materialize + matmul otherwise)."""
    layer = random_gptq_layer(96, 40, bits=bits, group_size=32, act_order=True, device=device)
    x = torch.randn(rows, 96, device=device).half()
    got = gptq_matmul(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits)
    want = gptq_matmul_ref(x.double(), layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits)
    assert relative_error(got, want) < RTOL
