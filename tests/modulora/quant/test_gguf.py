"""GGUF blocks: our bytes equal llama.cpp's (via the gguf package), and materialize equals its dequantize."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, dequantize, quantize

from modulora.quant.gguf import GGUFLinear

QTYPES = {
    "q4_0": GGMLQuantizationType.Q4_0,
    "q4_1": GGMLQuantizationType.Q4_1,
    "q8_0": GGMLQuantizationType.Q8_0,
}


@pytest.mark.parametrize("qtype", list(QTYPES))
def test_layer_from_ggml_bytes_materializes_as_gguf_dequantizes(qtype: str) -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((24, 96)).astype(np.float32)
    raw = quantize(weight, QTYPES[qtype])  # uint8 [24, bytes per row], llama.cpp's reference
    layer = GGUFLinear.from_ggml(raw, qtype, in_features=96)
    expected = torch.from_numpy(dequantize(raw, QTYPES[qtype]).astype(np.float32))
    torch.testing.assert_close(layer.materialize(torch.float32), expected, rtol=0, atol=0)


@pytest.mark.parametrize("qtype", list(QTYPES))
def test_from_float_matches_llama_cpp_quantization(qtype: str) -> None:
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((16, 64)).astype(np.float32)
    ours = GGUFLinear.from_float(torch.from_numpy(weight), qtype).materialize(torch.float32)
    theirs = torch.from_numpy(dequantize(quantize(weight, QTYPES[qtype]), QTYPES[qtype]).astype(np.float32))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_row_permutation_moves_whole_rows() -> None:
    layer = GGUFLinear.from_float(torch.randn(8, 64), "q4_1")
    dense = layer.materialize(torch.float32)
    order = torch.randperm(8)
    layer.permute_rows_(order)
    torch.testing.assert_close(layer.materialize(torch.float32), dense[order], rtol=0, atol=0)


def test_in_features_must_fill_whole_blocks() -> None:
    with pytest.raises(ValueError, match="in_features"):
        GGUFLinear(48, 8, "q4_0")
