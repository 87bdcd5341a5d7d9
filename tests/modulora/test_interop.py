"""What other stacks load from us: quantized bases (transformers' GPTQ form), PEFT adapters through
`AutoPeftModelForCausalLM`, merged dense folders, and llama.cpp LoRA GGUF files."""

import copy
import importlib.util
import json
from pathlib import Path

import gguf
import pytest
import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM
from utils.tiny_lm import quantize_rtn_, single_thread, tiny_llama, tiny_tokenizer, with_trained_lora_  # noqa: F401

from modulora.export import export_adapter, export_gguf_lora, export_merged
from modulora.lora import LoraConfig
from modulora.models import load_model, save_quantized
from modulora.quant import QuantConfig, get_quantizer

LORA = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
IDS = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
HAS_GPTQ_BACKEND = importlib.util.find_spec("gptqmodel") is not None


def _with_trained_lora(model: torch.nn.Module) -> torch.nn.Module:
    return with_trained_lora_(model, LORA, seed=1)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


@pytest.fixture(scope="module")
def gptq_base(tmp_path_factory) -> Path:
    model = quantize_rtn_(tiny_llama(), bits=4, group_size=32)
    config = QuantConfig(method="rtn", bits=4, group_size=32)
    return save_quantized(model, tiny_tokenizer(), config, tmp_path_factory.mktemp("bases") / "gptq4")


def test_gptq_base_carries_the_quantization_config_transformers_reads(gptq_base: Path) -> None:
    from transformers import GPTQConfig

    embedded = json.loads((gptq_base / "config.json").read_text())["quantization_config"]
    assert embedded == {
        "quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False,
        "checkpoint_format": "gptq",
    }  # fmt: skip
    parsed = GPTQConfig.from_dict(embedded)  # what transformers builds from config.json
    assert (parsed.bits, parsed.group_size, parsed.desc_act, parsed.sym) == (4, 32, False, False)
    assert "transformers" in (gptq_base / "README.md").read_text()


@pytest.mark.skipif(HAS_GPTQ_BACKEND, reason="gptqmodel installed: the next test loads through it")
def test_transformers_refuses_the_gptq_base_without_a_backend_instead_of_random_weights(gptq_base) -> None:
    """Before, config.json said nothing and transformers built plain Linear layers with random weights."""
    with pytest.raises(ImportError, match="(?i)gptq"):
        AutoModelForCausalLM.from_pretrained(gptq_base)


@pytest.mark.skipif(not HAS_GPTQ_BACKEND, reason="transformers' GPTQ path needs gptqmodel (a CUDA build)")
def test_transformers_gptq_path_gives_our_logits(gptq_base: Path) -> None:
    ours, _ = load_model(gptq_base)
    theirs = AutoModelForCausalLM.from_pretrained(gptq_base, dtype=torch.float16, device_map="auto")
    with torch.no_grad():
        got = theirs(IDS.to(theirs.device)).logits.float().cpu()
    torch.testing.assert_close(got, _logits(ours), atol=3e-2, rtol=3e-2)


def test_dense_copy_of_the_gptq_base_loads_in_plain_transformers_with_our_logits(gptq_base, tmp_path) -> None:
    """Where transformers has no GPTQ backend (CPU), the dequantized base (`export_merged` without an
    adapter; `modulora export --merge` without --adapter) is the dense form."""
    ours, tokenizer = load_model(gptq_base)
    expected = _logits(ours)
    dense = export_merged(ours, tmp_path / "dense", tokenizer, dtype=torch.float32)
    assert "quantization_config" not in json.loads((dense / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-5, rtol=1e-5)


def test_non_gptq_bases_say_they_load_only_here(tmp_path: Path) -> None:
    model = tiny_llama()
    quantizer = get_quantizer(QuantConfig(method="nf4", bits=4, group_size=32))
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, quantizer.quantize(module.weight.data, None, None))
    folder = save_quantized(
        model, tiny_tokenizer(), QuantConfig(method="nf4", bits=4, group_size=32), tmp_path / "nf4"
    )
    embedded = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert embedded["quant_method"] == "modulora" and embedded["formats"] == ["nf4"]
    assert "loads only with" in (folder / "README.md").read_text()
    loaded, _ = load_model(folder)  # ours still loads it
    torch.testing.assert_close(_logits(loaded), _logits(model))


def test_auto_peft_loads_an_exported_adapter_from_its_recorded_base(tmp_path: Path) -> None:
    """`base_model_name_or_path` names a folder transformers loads, so PEFT's one-call loader works."""
    base = tiny_llama()
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    trained = _with_trained_lora(copy.deepcopy(base))
    adapter = export_adapter(
        trained, tmp_path / "adapter", base_model="bases/tiny", quant_config=None, lora_config=LORA,
        tokenizer=tiny_tokenizer(), base_model_name_or_path=str(base_dir),
    )  # fmt: skip
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir)
    assert json.loads((adapter / "manifest.json").read_text())["base_model"] == "bases/tiny"
    loaded = AutoPeftModelForCausalLM.from_pretrained(adapter, dtype=torch.float32).eval()
    expected = _logits(trained)
    assert (expected - _logits(base)).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-5, rtol=1e-5)


def test_merged_export_loads_in_plain_transformers_with_the_adapters_logits(gptq_base, tmp_path) -> None:
    model, tokenizer = load_model(gptq_base)
    trained = _with_trained_lora(model)
    expected = _logits(trained)
    merged = export_merged(trained, tmp_path / "merged", tokenizer)  # bf16
    loaded = AutoModelForCausalLM.from_pretrained(merged)
    assert loaded.dtype == torch.bfloat16
    assert all(type(m) is torch.nn.Linear for n, m in loaded.named_modules() if n.endswith("q_proj"))
    got = _logits(loaded)
    # bf16 weights and activations: a few parts in a hundred of the logits' scale
    assert (got - expected).abs().max() <= 0.03 * expected.abs().max()
    assert (got - expected).abs().mean() <= 0.01 * expected.abs().mean() + 1e-3


def test_gguf_lora_reads_back_as_llama_cpp_writes_it(tmp_path: Path) -> None:
    base = tiny_llama()
    trained = _with_trained_lora(copy.deepcopy(base))
    adapter = export_adapter(
        trained, tmp_path / "adapter", base_model="tiny", quant_config=None, lora_config=LORA
    )
    out = export_gguf_lora(adapter, base.config.to_dict(), tmp_path / "exports" / "adapter.gguf")
    reader = gguf.GGUFReader(out)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == pytest.approx(8.0)
    tensors = {t.name: t for t in reader.tensors}
    hidden, inter, kv = 64, 128, 64 // 4 * 2
    outputs = {"attn_q": hidden, "attn_k": kv, "attn_v": kv, "attn_output": hidden,
               "ffn_gate": inter, "ffn_up": inter, "ffn_down": hidden}  # fmt: skip
    inputs = dict.fromkeys(outputs, hidden) | {"ffn_down": inter}
    expected = {}
    for layer in range(2):
        for name in outputs:
            # GGUF lists dimensions innermost first: A [r, in] is (in, r), B [out, r] is (r, out).
            expected[f"blk.{layer}.{name}.weight.lora_a"] = [inputs[name], 4]
            expected[f"blk.{layer}.{name}.weight.lora_b"] = [4, outputs[name]]
    assert {n: [int(d) for d in t.shape] for n, t in tensors.items()} == expected
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())
    # q's B rows are in llama.cpp's rotary order: undoing it (as our GGUF loader does) gives ours back.
    from modulora.models import unpermute_rotary_rows

    q = trained.model.layers[1].self_attn.q_proj
    stored = torch.from_numpy(tensors["blk.1.attn_q.weight.lora_b"].data.copy()).reshape(hidden, 4)
    torch.testing.assert_close(stored[unpermute_rotary_rows(hidden, 4)], q.lora_B["default"].weight)
    v = trained.model.layers[0].self_attn.v_proj
    stored_a = torch.from_numpy(tensors["blk.0.attn_v.weight.lora_a"].data.copy()).reshape(4, hidden)
    torch.testing.assert_close(stored_a, v.lora_A["default"].weight)
