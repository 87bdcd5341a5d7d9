"""NF4: QLoRA's codebook and block absmax, bitsandbytes' nibble order, nearest-level rounding."""

import torch

from gpu_kernels.materialize_nf4 import NF4_CODEBOOK
from modulora.quant import QuantConfig, get_quantizer
from modulora.quant.nf4 import NF4Linear

LEVELS = torch.tensor(NF4_CODEBOOK)


def test_values_on_the_codebook_round_trip_exactly() -> None:
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (8, 64))
    codes[:, 0] = 15  # every block (one row of 64) reaches +1, so its absmax is its scale
    absmax = torch.rand(8) + 0.5
    weight = LEVELS[codes] * absmax[:, None]
    layer = NF4Linear.from_float(weight)
    torch.testing.assert_close(layer.materialize(torch.float32), weight, rtol=0, atol=0)


def test_first_element_goes_in_the_high_nibble() -> None:
    weight = torch.zeros(1, 64)
    weight[0, 0], weight[0, 1] = 1.0, -1.0  # codes 15 and 0
    layer = NF4Linear.from_float(weight)
    assert layer.packed[0].item() == 0xF0
    assert layer.packed[1].item() == (7 << 4) | 7  # zeros are code 7


def test_each_value_rounds_to_the_nearest_level() -> None:
    torch.manual_seed(1)
    weight = torch.randn(12, 80)  # 960 weights = 15 blocks of 64, blocks spanning rows
    layer = NF4Linear.from_float(weight)
    blocks = weight.flatten().view(-1, 64)
    normalized = blocks / blocks.abs().amax(dim=1, keepdim=True)
    nearest = LEVELS[(normalized.flatten()[:, None] - LEVELS).abs().argmin(dim=1)].view(-1, 64)
    expected = (nearest * blocks.abs().amax(dim=1, keepdim=True)).view(12, 80)
    torch.testing.assert_close(layer.materialize(torch.float32), expected, rtol=1e-6, atol=1e-6)


def test_odd_shapes_pad_the_last_block() -> None:
    weight = torch.randn(7, 9)  # 63 weights: one padded block
    layer = get_quantizer(QuantConfig(method="nf4", bits=4)).quantize(weight, None, None)
    assert layer.absmax.shape == (1,) and layer.packed.shape == (32,)
    # NF4's widest gap between levels is 0.30 of absmax: the error stays under half of it.
    assert (layer.materialize(torch.float32) - weight).abs().max() <= 0.16 * weight.abs().max()
