"""Models: HF folders (GQA, Qwen2 biases), quantized folders for every format, the built-in SmolLM2."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from modulora.models import builtin_gguf, is_quantized_dir, load_model, resolve_model, save_quantized
from modulora.quant import QuantConfig, QuantizedLinear
from modulora.quant.gguf import GGUFLinear
from modulora.quantize import quantize_
from modulora.weights import SafetensorsSource
from tests.utils.tiny_lm import tiny_llama, tiny_tokenizer

FORMAT_CONFIGS = [
    QuantConfig(method="rtn", bits=3, group_size=32),
    QuantConfig(method="optq", bits=4, group_size=32, n_samples=4, seq_len=16),
    QuantConfig(method="nf4", bits=4),
    QuantConfig(method="gguf", bits=4),
    QuantConfig(method="gguf", bits=8),
]


def tiny_qwen2() -> Qwen2ForCausalLM:
    """A random 2-layer Qwen2: q/k/v projections with biases, GQA, tied embeddings."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    return Qwen2ForCausalLM(config).eval()


MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2}


@pytest.fixture(params=list(MODELS))
def hf_folder(request, tmp_path):
    model = MODELS[request.param]()
    model.save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", model


def logits(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def test_hf_folder_loads_with_the_same_logits(hf_folder) -> None:
    folder, original = hf_folder
    model, tokenizer = load_model(folder)
    assert tokenizer.pad_token is not None
    torch.testing.assert_close(logits(model), logits(original), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", FORMAT_CONFIGS, ids=lambda c: f"{c.method}{c.bits}")
def test_quantized_folder_reloads_identically(hf_folder, tmp_path, config: QuantConfig) -> None:
    folder, _ = hf_folder
    model, tokenizer = load_model(folder)
    calibration = torch.randint(0, 400, (4, 16), generator=torch.Generator().manual_seed(1))
    quantize_(model, config, calibration)
    out = save_quantized(model, tokenizer, config, tmp_path / "quantized", base=str(folder))
    assert is_quantized_dir(out)

    reloaded, _ = load_model(out)
    quantized = {n: type(m) for n, m in reloaded.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(quantized) == 2 * 7
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=0)


def test_bfloat16_load_keeps_packed_scales_in_their_dtype(hf_folder, tmp_path) -> None:
    folder, _ = hf_folder
    model, tokenizer = load_model(folder)
    config = QuantConfig(method="rtn", bits=4, group_size=32)
    out = save_quantized(quantize_(model, config), tokenizer, config, tmp_path / "q")
    reloaded, _ = load_model(out, dtype=torch.bfloat16)
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert reloaded.model.layers[0].self_attn.q_proj.scales.dtype == torch.float16


def test_unknown_reference_names_the_accepted_kinds(tmp_path) -> None:
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        resolve_model(tmp_path / "missing")


@pytest.mark.slow
def test_builtin_smollm2_loads_and_answers(smollm2) -> None:
    model, tokenizer = load_model("smollm2-135m-instruct")
    assert resolve_model("smollm2-135m-instruct") == smollm2
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_token = model(ids).logits[0, -1].argmax()
    assert tokenizer.decode(next_token).strip() == "Paris"


@pytest.mark.slow
def test_gguf_converts_block_by_block_into_what_transformers_loads(smollm2) -> None:
    """The built-in GGUF's converted folder (the `smollm2` fixture) holds, one shard per decoder block,
    exactly the float32 weights transformers' own GGUF loader builds the model with."""
    gguf = builtin_gguf("smollm2-135m-instruct")
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    assert len(list(smollm2.glob("model-*-of-00032.safetensors"))) == 32  # 30 blocks, embedding, norm
    streamed = SafetensorsSource(smollm2, aliases={"lm_head.weight": "model.embed_tokens.weight"})
    for name, tensor in reference.state_dict().items():
        assert torch.equal(streamed.get(name), tensor), name


# Peak RSS while the tensors are dequantized and written, over the RSS just before (the metadata
# and the model's skeleton already in memory), in MiB.
_CONVERSION_RSS = """
import tempfile
from pathlib import Path
from modulora.models import _open_gguf, _write_blocks, builtin_gguf

def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

source = _open_gguf(builtin_gguf("smollm2-135m-instruct"))
Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the RSS now
before = kib("VmRSS:")
_write_blocks(source, Path(tempfile.mkdtemp()))
print((kib("VmHWM:") - before) >> 10)
"""


@pytest.mark.slow
def test_gguf_conversion_never_holds_the_dequantized_model(smollm2) -> None:
    """The float32 model is 513 MiB; its largest block (the embedding) 108 MiB. Written block by
    block, the conversion's peak stays near two copies of a block (the block and its serialized
    shard), well under the model."""
    model_mib = sum(f.stat().st_size for f in smollm2.glob("*.safetensors")) >> 20
    run = subprocess.run([sys.executable, "-c", _CONVERSION_RSS], capture_output=True, text=True, check=True)
    growth_mib = int(run.stdout.split()[-1])
    assert growth_mib < 0.65 * model_mib, f"peak RSS grew {growth_mib} MiB for a {model_mib} MiB model"


@pytest.mark.slow
def test_native_q4_1_base_equals_the_dequantized_weights(smollm2) -> None:
    dense, _ = load_model("smollm2-135m-instruct")
    native, _ = load_model("smollm2-135m-instruct:gguf")
    layers = {n: m for n, m in native.named_modules() if isinstance(m, GGUFLinear)}
    assert len(layers) == 30 * 7 and {m.qtype for m in layers.values()} == {"q4_1"}
    # q/k rows were permuted for rotary by llama.cpp: the un-permutation must be exact, as for the rest.
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"):
        for index in (0, 29):
            key = f"model.layers.{index}.{name}"
            torch.testing.assert_close(
                layers[key].materialize(torch.float32), dense.get_submodule(key).weight, rtol=0, atol=0
            )
    # Same weights everywhere else too, so the same logits (hence the same perplexity, in
    # docs/benchmarks.md): float32 matmuls differ from F.linear on W only in summation order.
    ids = torch.tensor([[504, 3575, 282, 4649, 314]])
    with torch.no_grad():
        torch.testing.assert_close(native(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)


def test_quantized_base_dir_is_one_folder_per_model_and_quantization(tmp_path, monkeypatch) -> None:
    from modulora.models import quantized_base_dir
    from modulora.settings import get_settings

    monkeypatch.setenv("MODULORA_HOME", str(tmp_path))
    get_settings.cache_clear()
    try:
        rtn4 = quantized_base_dir("smollm2-135m-instruct", QuantConfig(method="rtn", bits=4, group_size=64))
        assert rtn4 == quantized_base_dir(
            "smollm2-135m-instruct", QuantConfig(method="rtn", bits=4, group_size=64)
        )
        assert rtn4.parent == tmp_path / "bases" and rtn4.name.startswith("smollm2-135m-instruct-rtn-4b-g64-")
        others = {
            quantized_base_dir("smollm2-135m-instruct", QuantConfig(method="rtn", bits=3, group_size=64)),
            quantized_base_dir("smollm2-135m-instruct", QuantConfig(method="optq", bits=4, group_size=64)),
            quantized_base_dir(
                "smollm2-135m-instruct", QuantConfig(method="rtn", bits=4, group_size=64, seed=1)
            ),
            quantized_base_dir("/models/other", QuantConfig(method="rtn", bits=4, group_size=64)),
        }
        assert rtn4 not in others and len(others) == 4
    finally:
        get_settings.cache_clear()
