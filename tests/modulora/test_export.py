"""PEFT export: `peft` on the dequantized base gives our quantized base + adapter's logits."""

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from utils.tiny_lm import quantize_rtn_, single_thread, tiny_llama, tiny_tokenizer, with_trained_lora_  # noqa: F401

from modulora.export import dequantize_model, export_adapter, load_adapter, read_manifest
from modulora.lora import LoraConfig, add_lora_
from modulora.quant import QuantConfig
from modulora.train import TrainConfig

LORA = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear")


@pytest.fixture(scope="module")
def quantized_base():
    return quantize_rtn_(tiny_llama(), bits=3, group_size=32)


@pytest.fixture(scope="module")
def trained(quantized_base):
    return with_trained_lora_(copy.deepcopy(quantized_base), LORA, seed=0)


@pytest.fixture(scope="module")
def adapter_dir(trained, tmp_path_factory) -> Path:
    return export_adapter(
        trained,
        tmp_path_factory.mktemp("adapters") / "a1",
        base_model="tiny-llama-rtn3",
        quant_config=QuantConfig(method="rtn", bits=3, group_size=32),
        lora_config=LORA,
        train_config=TrainConfig(max_steps=5),
        dataset_sha256="ab" * 32,
        tokenizer=tiny_tokenizer(),
        metrics={"train_loss": 1.5},
    )


def test_export_writes_peft_files_and_manifest(adapter_dir: Path) -> None:
    names = {p.name for p in adapter_dir.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
        "tokenizer_config.json",
    } <= names
    keys = load_file(adapter_dir / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 7 * 2  # A and B for 7 projections in 2 layers
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    manifest = read_manifest(adapter_dir)
    assert manifest["base_model"] == "tiny-llama-rtn3" and manifest["dataset_sha256"] == "ab" * 32
    assert manifest["quantization"]["bits"] == 3 and manifest["training"]["max_steps"] == 5
    assert set(manifest["libraries"]) >= {"torch", "transformers", "peft"}


def test_peft_on_dequantized_base_matches_quantized_base_with_adapter(
    quantized_base, trained, adapter_dir
) -> None:
    dense_base = dequantize_model(copy.deepcopy(quantized_base))
    peft_model = peft.PeftModel.from_pretrained(dense_base, str(adapter_dir)).eval()
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = trained(ids).logits, peft_model(ids).logits
        base = quantized_base(ids).logits
    assert (ours - base).abs().max() > 1e-2, (
        "the adapter must change the logits for this test to mean anything"
    )
    # Same weights in float32; only the LoRA summation order differs.
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_load_adapter_restores_the_trained_model(quantized_base, trained, adapter_dir) -> None:
    restored = load_adapter(copy.deepcopy(quantized_base), adapter_dir).eval()
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(restored(ids).logits, trained(ids).logits, rtol=0, atol=0)


def test_load_adapter_rejects_a_mismatched_model(adapter_dir, tmp_path: Path) -> None:
    other = tiny_llama()
    add_lora_(other, LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="keys do not match"):
        load_adapter(other, adapter_dir)


def test_dequantize_model_materializes_every_quantized_layer(quantized_base) -> None:
    dense = dequantize_model(copy.deepcopy(quantized_base))
    q = quantized_base.model.layers[1].mlp.down_proj
    torch.testing.assert_close(dense.model.layers[1].mlp.down_proj.weight, q.materialize(torch.float32))
    ids = torch.randint(0, 400, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, quantized_base(ids).logits, rtol=1e-5, atol=1e-5)
