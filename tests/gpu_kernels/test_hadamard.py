"""The Hadamard transform: equals the dense matrix product, inverts itself, Triton equals the reference."""

import importlib
import math

import pytest
import torch

from gpu_kernels import hadamard, hadamard_factors, hadamard_matrix, hadamard_ref

hadamard_module = importlib.import_module(
    "gpu_kernels.hadamard"
)  # the package exports a function of that name

# SmolLM2 (192, 576, 1536) and LLaMA (4096, 5120, 8192, 11008, 13824, 22016) dimensions.
MODEL_DIMS = [192, 576, 1536, 4096, 5120, 8192, 11008, 13824, 22016]


@pytest.mark.parametrize("n", MODEL_DIMS)
def test_factors_of_model_dims_give_orthogonal_hadamard(n: int) -> None:
    k, p = hadamard_factors(n)
    assert k * p == n and p & (p - 1) == 0
    if k > 1:
        small = hadamard_module._small_hadamard(k).double()
        assert set(small.unique().tolist()) == {-1.0, 1.0}
        torch.testing.assert_close(small @ small.T, k * torch.eye(k, dtype=torch.float64), rtol=0, atol=0)


def test_factors_reject_order_without_built_in_matrix() -> None:
    with pytest.raises(ValueError, match="n: no Hadamard matrix of order 184"):
        hadamard_factors(184)  # 23·8: neither 92 nor 184 is a Paley order


@pytest.mark.parametrize("n", [2, 12, 48, 64, 192, 576])
@pytest.mark.parametrize("transpose", [False, True])
def test_hadamard_equals_dense_matrix_product(n: int, transpose: bool) -> None:
    x = torch.randn(3, 5, n, dtype=torch.float64)
    dense = hadamard_matrix(n, torch.float64)
    expected = x @ (dense if transpose else dense.T)
    # fp32 accumulation: ~1e-7 relative error per element.
    torch.testing.assert_close(hadamard_ref(x, transpose), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [64, 576, 1536])
def test_hadamard_is_orthonormal_and_inverted_by_its_transpose(n: int) -> None:
    x = torch.randn(7, n)
    y = hadamard_ref(x)
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1), rtol=1e-5, atol=0)
    torch.testing.assert_close(hadamard_ref(y, transpose=True), x, rtol=1e-5, atol=1e-5)


def test_unnormalized_power_of_two_transform_is_its_own_inverse_up_to_n() -> None:
    x = torch.randn(4, 256)
    twice = hadamard_ref(hadamard_ref(x, scale=1.0), scale=1.0)
    torch.testing.assert_close(twice, 256 * x, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("shape", "transpose"), [((3, 48), False), ((5, 7, 192), True), ((1, 64), False), ((9, 2), True)]
)
def test_triton_equals_reference(
    device: torch.device, shape: tuple[int, ...], transpose: bool, dtype: torch.dtype
) -> None:
    x = torch.randn(shape, device=device).to(dtype)
    y = hadamard(x, transpose)
    assert y.dtype == dtype and y.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # both accumulate in fp32; bf16 rounds the result
    torch.testing.assert_close(y, hadamard_ref(x, transpose), rtol=tol, atol=tol * math.sqrt(shape[-1]))
