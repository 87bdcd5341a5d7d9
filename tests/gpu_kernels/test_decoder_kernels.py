"""The fused decode-step kernels (residual add + RMSNorm, rotary, SwiGLU gate) against their references."""

import pytest
import torch

from gpu_kernels.rmsnorm import add_rmsnorm, add_rmsnorm_ref
from gpu_kernels.rotary import apply_rotary_, apply_rotary_ref
from gpu_kernels.swiglu import silu_mul, silu_mul_ref


@pytest.mark.parametrize("hidden", [64, 576, 100])  # 100: a row shorter than its power-of-two block
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rmsnorm_matches_reference(device: torch.device, hidden: int, with_residual: bool) -> None:
    x = torch.randn(3, 2, hidden, device=device)
    residual = torch.randn(3, 2, hidden, device=device) if with_residual else None
    weight = torch.rand(hidden, device=device) + 0.5
    normed, summed = add_rmsnorm(x, residual, weight, 1e-5)
    want_normed, want_summed = add_rmsnorm_ref(x, residual, weight, 1e-5)
    torch.testing.assert_close(summed, want_summed, rtol=0, atol=0)
    torch.testing.assert_close(normed, want_normed, rtol=1e-5, atol=1e-5)


def test_add_rmsnorm_rounds_like_the_model_in_half_precision(device: torch.device) -> None:
    x = torch.randn(4, 256, device=device).half()
    residual = torch.randn(4, 256, device=device).half()
    weight = (torch.rand(256, device=device) + 0.5).half()
    normed, summed = add_rmsnorm(x, residual, weight, 1e-6)
    want_normed, want_summed = add_rmsnorm_ref(x, residual, weight, 1e-6)
    assert normed.dtype == torch.float16 and torch.equal(summed, want_summed)
    torch.testing.assert_close(normed, want_normed, rtol=2e-3, atol=2e-3)  # one fp16 ulp at most


@pytest.mark.parametrize("heads", [4, 3])  # 3: a head count that is not a power of two
def test_rotary_in_place_matches_reference(device: torch.device, heads: int) -> None:
    x = torch.randn(2, 5, heads, 16, device=device)
    angles = torch.rand(2, 5, 8, device=device) * 6
    cos = torch.cat([angles.cos(), angles.cos()], -1)
    sin = torch.cat([angles.sin(), angles.sin()], -1)
    want = apply_rotary_ref(x, cos, sin)
    got = apply_rotary_(x, cos, sin)
    assert got.data_ptr() == x.data_ptr()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 1, 688), (2, 3, 1500)])
def test_silu_mul_matches_reference(device: torch.device, shape: tuple) -> None:
    gate, up = torch.randn(shape, device=device) * 4, torch.randn(shape, device=device)
    torch.testing.assert_close(silu_mul(gate, up), silu_mul_ref(gate, up), rtol=1e-5, atol=1e-6)


def test_rotary_rotates_a_column_slice_of_a_fused_projection(device: torch.device) -> None:
    qkv = torch.randn(2, 3, 3 * 4 * 16, device=device)  # q, k, v side by side, 4 heads of 16 each
    q = qkv[..., : 4 * 16].view(2, 3, 4, 16)
    angles = torch.rand(2, 3, 8, device=device)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    rest = qkv[..., 4 * 16 :].clone()
    want = apply_rotary_ref(q, cos, sin)
    apply_rotary_(q, cos, sin)
    torch.testing.assert_close(q, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(qkv[..., 4 * 16 :], rest), "k and v must be left alone"


def test_silu_mul_reads_column_slices_of_a_fused_gate_up_product(device: torch.device) -> None:
    gate_up = torch.randn(2, 3, 2 * 300, device=device)
    gate, up = gate_up.split(300, dim=-1)
    got = silu_mul(gate, up)
    assert got.is_contiguous() and got.shape == (2, 3, 300)
    torch.testing.assert_close(got, silu_mul_ref(gate, up), rtol=1e-5, atol=1e-6)
