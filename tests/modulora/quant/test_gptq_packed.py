"""GPTQ packing: bit-exact round trips at 2/3/4/8 bits, zero-point formats v1/v2, checkpoints reload."""

import json

import pytest
import torch
from safetensors.torch import save_file

from gpu_kernels import unpack_bits_ref
from modulora.models import load_model, save_quantized
from modulora.quant import QuantConfig
from modulora.quant.gptq_packed import GPTQLinear, fit_scale_zero, fuse_outputs_, pack_bits, quantize_codes
from modulora.quantize import quantize_
from tests.utils.tiny_lm import tiny_llama, tiny_tokenizer


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("count", [1, 10, 11, 21, 22, 32, 33, 96, 100])
def test_pack_then_unpack_returns_the_codes(bits: int, count: int) -> None:
    torch.manual_seed(bits * 100 + count)
    codes = torch.randint(0, 2**bits, (count, 7), dtype=torch.int32)
    packed = pack_bits(codes, bits)
    assert packed.shape == ((count * bits + 31) // 32, 7)
    torch.testing.assert_close(unpack_bits_ref(packed, bits, count), codes, rtol=0, atol=0)


def test_three_bit_codes_straddle_words_as_gptq_does() -> None:
    # Code 10 takes bits 30-31 of word 0 and bit 0 of word 1; code 21 bit 31 of word 1, bits 0-1 of word 2.
    codes = torch.zeros(32, 1, dtype=torch.int32)
    codes[10], codes[21] = 0b111, 0b111
    words = pack_bits(codes, 3)[:, 0].to(torch.int64) & 0xFFFFFFFF
    assert words.tolist() == [0b11 << 30, (1 << 31) | 1, 0b11]


def _random_layer(bits: int, group: int, in_features: int = 96, out_features: int = 40) -> GPTQLinear:
    torch.manual_seed(bits)
    weight = torch.randn(out_features, in_features)
    groups = in_features // group
    scales, zeros = [], []
    codes = torch.empty(out_features, in_features, dtype=torch.int32)
    for g in range(groups):
        block = weight[:, g * group : (g + 1) * group]
        scale, zero = fit_scale_zero(block, bits, sym=False)
        codes[:, g * group : (g + 1) * group] = quantize_codes(block, scale, zero, bits).int()
        scales.append(scale)
        zeros.append(zero)
    g_idx = torch.randperm(in_features) % groups  # act-order style: not monotone
    codes = codes[:, torch.argsort(torch.argsort(g_idx, stable=True))]  # any codes work for the round trip
    return GPTQLinear.from_codes(codes, torch.stack(scales), torch.stack(zeros).int(), g_idx, bits, group)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_v2_zero_format_equals_v1_with_zeros_shifted(bits: int) -> None:
    v1 = _random_layer(bits, 32)
    zeros = unpack_bits_ref(v1.qzeros.T.contiguous(), bits, v1.out_features).T + 1  # true zero points
    v2 = GPTQLinear(v1.in_features, v1.out_features, bits, 32, zero_offset=0)
    v2.load_state_dict({**v1.state_dict(), "qzeros": pack_bits(zeros.T, bits).T.contiguous()})
    torch.testing.assert_close(v2.materialize(torch.float32), v1.materialize(torch.float32), rtol=0, atol=0)


def test_from_codes_materializes_scale_times_code_minus_zero() -> None:
    codes = torch.tensor([[0, 3, 1, 2]], dtype=torch.int32)
    layer = GPTQLinear.from_codes(
        codes, torch.tensor([[0.5], [2.0]]), torch.tensor([[1], [2]]), torch.tensor([0, 0, 1, 1]), 2, 2
    )
    expected = torch.tensor([[0.5 * (0 - 1), 0.5 * (3 - 1), 2.0 * (1 - 2), 2.0 * (2 - 2)]])
    torch.testing.assert_close(layer.materialize(torch.float32), expected, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_checkpoint_written_here_reloads_identically(tmp_path, bits: int) -> None:
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    config = QuantConfig(method="rtn", bits=bits, group_size=32)
    quantize_(model, config)
    out = save_quantized(model, tokenizer, config, tmp_path / "q")
    reloaded, _ = load_model(out)

    saved = json.loads((out / "quantize_config.json").read_text())
    assert {k: saved[k] for k in ("bits", "group_size", "sym", "quant_method", "checkpoint_format")} == {
        "bits": bits, "group_size": 32, "sym": False, "quant_method": "gptq", "checkpoint_format": "gptq",
    }  # fmt: skip
    ids = torch.randint(0, 400, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("checkpoint_format", "config_file"),
    [("gptq", "quantize_config.json"), ("gptq_v2", "quantize_config.json"), ("gptq", "config.json")],
)
def test_hub_style_gptq_checkpoint_loads(tmp_path, checkpoint_format: str, config_file: str) -> None:
    """AutoGPTQ/GPTQModel layout: fp16 dense tensors, a zero bias per layer, no "modulora" key."""
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    config = QuantConfig(method="rtn", bits=4, group_size=32)
    quantize_(model, config)
    folder = tmp_path / "hub"
    folder.mkdir()
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    state = {}
    for key, tensor in model.state_dict().items():
        if key.endswith("qzeros") and checkpoint_format == "gptq_v2":
            layer = model.get_submodule(key.removesuffix(".qzeros"))
            zeros = unpack_bits_ref(tensor.T.contiguous(), 4, layer.out_features).T + 1
            tensor = pack_bits(zeros.T, 4).T.contiguous()
        state[key] = tensor.half() if tensor.is_floating_point() and "scales" not in key else tensor
    for name in [k.removesuffix(".qweight") for k in state if k.endswith(".qweight")]:
        state[f"{name}.bias"] = torch.zeros(model.get_submodule(name).out_features, dtype=torch.float16)
    save_file(state, str(folder / "model.safetensors"))
    gptq = {
        "bits": 4,
        "group_size": 32,
        "desc_act": False,
        "sym": False,
        "checkpoint_format": checkpoint_format,
    }
    if config_file == "config.json":  # transformers/optimum style: inside the model config
        hf_config = json.loads((folder / "config.json").read_text())
        hf_config["quantization_config"] = {**gptq, "quant_method": "gptq"}
        (folder / "config.json").write_text(json.dumps(hf_config))
    else:
        (folder / "quantize_config.json").write_text(json.dumps(gptq))

    reloaded, _ = load_model(folder)
    name = "model.layers.1.mlp.down_proj"
    torch.testing.assert_close(
        reloaded.get_submodule(name).materialize(torch.float32),
        model.get_submodule(name).materialize(torch.float32), rtol=0, atol=0,
    )  # fmt: skip


def test_saving_over_a_folder_that_is_not_a_quantized_model_is_refused(tmp_path) -> None:
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    config = QuantConfig(method="rtn", bits=4, group_size=32)
    quantize_(model, config)
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="out_dir"):
        save_quantized(model, tokenizer, config, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def random_layer(out_features: int, bits: int, g_idx: torch.Tensor, bias: bool = False) -> GPTQLinear:
    groups = int(g_idx.max()) + 1
    return GPTQLinear.from_codes(
        torch.randint(0, 2**bits, (out_features, g_idx.shape[0])),
        torch.rand(groups, out_features) / 8 + 0.01,
        torch.randint(1, 2**bits, (groups, out_features)),
        g_idx, bits, 32, bias=torch.randn(out_features) if bias else None,
    )  # fmt: skip


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fused_outputs_are_the_layers_outputs_side_by_side_without_a_second_copy(bits: int) -> None:
    g_idx = torch.arange(96) // 32
    layers = [random_layer(width, bits, g_idx, bias=True) for width in (64, 32, 32)]  # q, k, v (GQA)
    x = torch.randn(3, 96)
    alone = [layer(x) for layer in layers]
    fused = fuse_outputs_(layers)
    assert fused is not None and fused.out_features == 128
    torch.testing.assert_close(fused(x), torch.cat(alone, dim=-1))
    for layer, want in zip(layers, alone, strict=True):
        assert layer.qweight.untyped_storage().data_ptr() == fused.qweight.untyped_storage().data_ptr()
        torch.testing.assert_close(layer(x), want, rtol=0, atol=0)


def test_layers_that_cannot_share_one_product_are_not_fused() -> None:
    g_idx = torch.arange(96) // 32
    permuted = g_idx[torch.randperm(96, generator=torch.Generator().manual_seed(0))]  # act-order
    assert fuse_outputs_([random_layer(64, 4, g_idx), random_layer(64, 4, permuted)]) is None
    assert fuse_outputs_([random_layer(64, 4, g_idx), random_layer(64, 2, g_idx)]) is None
    assert fuse_outputs_([random_layer(64, 4, g_idx), random_layer(36, 4, g_idx)]) is None  # 36 % 8
    assert fuse_outputs_([random_layer(64, 3, g_idx), random_layer(64, 3, g_idx)]) is None
