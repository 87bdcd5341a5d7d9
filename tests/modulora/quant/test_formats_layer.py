"""Every quantizer × bit width through the ModuLoRA layer: forward = x·dequant(W)ᵀ, input grad = dense."""

import pytest
import torch

from modulora.quant import QuantConfig, QuantizedLinear, get_quantizer

CASES = [
    *[(method, bits, group) for method in ("rtn", "optq") for bits in (2, 3, 4, 8) for group in (32, -1)],
    ("nf4", 4, 64),
    *[("gguf", bits, 32) for bits in (4, 8)],
]


def make_layer(
    method: str, bits: int, group: int, out_features: int = 96, in_features: int = 160
) -> QuantizedLinear:
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features)
    x = torch.randn(256, in_features)
    hessian = 2 * x.T @ x / x.shape[0]
    quantizer = get_quantizer(QuantConfig(method=method, bits=bits, group_size=group))
    return quantizer.quantize(weight, torch.randn(out_features), hessian if quantizer.needs_hessian else None)


@pytest.mark.parametrize(("method", "bits", "group"), CASES)
def test_forward_and_input_grad_match_dense(method: str, bits: int, group: int) -> None:
    layer = make_layer(method, bits, group)
    dense = layer.materialize(torch.float32)
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    grad_out = torch.randn(3, 5, layer.out_features)

    y = layer(x)
    y.backward(grad_out)
    y_ref = x_ref @ dense.T + layer.bias
    y_ref.backward(grad_out)

    # float32 matmuls of the same operands: only summation order differs.
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("method", "bits", "group"), CASES)
def test_empty_layer_loads_the_state_dict_back_exactly(method: str, bits: int, group: int) -> None:
    layer = make_layer(method, bits, group)
    empty = type(layer).empty(layer.in_features, layer.out_features, True, layer.format_config())
    empty.load_state_dict(layer.state_dict())
    torch.testing.assert_close(
        empty.materialize(torch.float32), layer.materialize(torch.float32), rtol=0, atol=0
    )
