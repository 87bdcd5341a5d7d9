"""The ModuLoRA layer: no dense weight saved for backward, the base frozen, LoRA starting at zero."""

import pytest
import torch

from modulora.lora import LoraConfig, LoraLinear
from modulora.quant import FORMATS, QuantConfig, QuantizedLinear, get_quantizer


def rtn_layer(bits: int = 4, out_features: int = 96, in_features: int = 160) -> QuantizedLinear:
    """A round-to-nearest layer (group 32) of a random weight; every format's forward and
    input gradient are checked against the dense reference in quant/test_formats_layer.py."""
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features)
    return get_quantizer(QuantConfig(method="rtn", bits=bits, group_size=32)).quantize(weight, None, None)


def test_no_dense_weight_saved_for_backward() -> None:
    layer = LoraLinear(rtn_layer(), LoraConfig(r=4, dropout=0.0))
    saved_shapes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved_shapes.append(tuple(t.shape))
        return t

    x = torch.randn(4, layer.in_features, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()

    dense_shapes = {(layer.out_features, layer.in_features), (layer.in_features, layer.out_features)}
    assert saved_shapes, "the LoRA branch saves its inputs, so the hook must have seen tensors"
    assert not dense_shapes & set(saved_shapes)


def test_base_weight_gets_no_gradient_and_lora_starts_at_zero() -> None:
    base = rtn_layer()
    layer = LoraLinear(base, LoraConfig(r=4, dropout=0.0))
    x = torch.randn(2, base.in_features)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    layer(x).pow(2).sum().backward()
    assert all(not p.requires_grad for p in base.parameters())
    assert layer.lora_A["default"].weight.grad is None or layer.lora_A["default"].weight.grad.abs().sum() == 0
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_autocast_computes_in_autocast_dtype(dtype: torch.dtype) -> None:
    layer = LoraLinear(rtn_layer(), LoraConfig(r=4, dropout=0.0))
    x = torch.randn(4, layer.in_features, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype
    y.float().sum().backward()
    dense = layer.base_layer.materialize(torch.float32)
    expected = torch.ones(4, layer.out_features) @ dense
    # bf16 keeps 8 mantissa bits: about 0.4% of the row sums (|sum| ~ 10).
    torch.testing.assert_close(x.grad, expected, rtol=2e-2, atol=1e-1)


def test_every_registered_format_rebuilds_empty_from_its_config() -> None:
    layer = rtn_layer(bits=3)
    empty = FORMATS[layer.format].empty(layer.in_features, layer.out_features, False, layer.format_config())
    empty.load_state_dict(layer.state_dict())
    torch.testing.assert_close(empty.materialize(torch.float32), layer.materialize(torch.float32))
