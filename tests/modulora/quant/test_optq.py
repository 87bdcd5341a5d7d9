"""OPTQ: beats round-to-nearest on its own objective, and its act-order / groups / clipping options hold."""

import pytest
import torch

from modulora.quant import QuantConfig, get_quantizer
from modulora.quant.optq import search_scale_zero


def correlated_inputs(n: int = 512, features: int = 128, seed: int = 0) -> torch.Tensor:
    """Activations with outlier channels and correlations, as in real layers (OPTQ's advantage needs both)."""
    torch.manual_seed(seed)
    mix = torch.randn(features, features) / features**0.5 + torch.eye(features)
    scale = torch.ones(features)
    scale[:8] = 10.0
    return (torch.randn(n, features) @ mix) * scale


def output_error(
    method: str, bits: int, group: int, x: torch.Tensor, weight: torch.Tensor, **options
) -> float:
    hessian = 2 * x.T @ x / x.shape[0]
    config = QuantConfig(method=method, bits=bits, group_size=group, options=options)
    layer = get_quantizer(config).quantize(weight, None, hessian)
    return ((x @ (layer.materialize(torch.float32) - weight).T) ** 2).mean().item()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, -1])
def test_optq_output_error_is_below_rtn(bits: int, group: int) -> None:
    x = correlated_inputs()
    weight = torch.randn(64, 128)
    assert output_error("optq", bits, group, x, weight) < output_error("rtn", bits, group, x, weight)


def test_clipping_search_does_not_increase_the_weighted_error() -> None:
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    w[:, 0] = 8.0  # an outlier stretches the min/max grid
    column_weight = torch.rand(64) + 0.1

    def weighted_error(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        q = (torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, 7) - zero[:, None]) * scale[
            :, None
        ]
        return ((q - w) ** 2 * column_weight).sum(dim=1)

    plain = weighted_error(*search_scale_zero(w, 3, False, column_weight, grid=0, max_shrink=0.25))
    searched = weighted_error(*search_scale_zero(w, 3, False, column_weight, grid=20, max_shrink=0.25))
    assert (searched <= plain + 1e-6).all()


def test_act_order_stores_a_permuted_g_idx_and_static_groups_a_contiguous_one() -> None:
    x = correlated_inputs(features=96)
    hessian = 2 * x.T @ x / x.shape[0]
    weight = torch.randn(16, 96)
    contiguous = torch.arange(96, dtype=torch.int32) // 32

    act_order = get_quantizer(QuantConfig(method="optq", bits=4, group_size=32)).quantize(
        weight, None, hessian
    )
    assert not torch.equal(act_order.g_idx, contiguous)
    assert torch.bincount(act_order.g_idx).tolist() == [32, 32, 32]

    static = get_quantizer(
        QuantConfig(method="optq", bits=4, group_size=32, options={"static_groups": True})
    ).quantize(weight, None, hessian)
    torch.testing.assert_close(static.g_idx, contiguous, rtol=0, atol=0)


@pytest.mark.parametrize("sym", [False, True])
def test_quantized_weight_is_close_to_the_original(sym: bool) -> None:
    x = correlated_inputs()
    weight = torch.randn(64, 128)
    layer = get_quantizer(QuantConfig(method="optq", bits=8, group_size=-1, sym=sym)).quantize(
        weight, None, 2 * x.T @ x / x.shape[0]
    )
    # 8 bits per channel: the error is ~1% of the weights' scale, far below a 5% bound.
    relative = (layer.materialize(torch.float32) - weight).norm() / weight.norm()
    assert relative < 0.05


def test_dead_inputs_are_quantized_to_zero() -> None:
    x = correlated_inputs()
    x[:, 5] = 0
    weight = torch.randn(16, 128)
    layer = get_quantizer(QuantConfig(method="optq", bits=4, group_size=32)).quantize(
        weight, None, 2 * x.T @ x / x.shape[0]
    )
    # The input never fires, so its column only needs to land on the grid's zero (within one step).
    column = layer.materialize(torch.float32)[:, 5]
    step = layer.scales.float().max()
    assert column.abs().max() <= step


def test_optq_without_a_hessian_names_the_missing_input() -> None:
    with pytest.raises(ValueError, match="hessian"):
        get_quantizer(QuantConfig(method="optq")).quantize(torch.randn(4, 32), None, None)
