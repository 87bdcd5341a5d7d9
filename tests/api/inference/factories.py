"""Small quantized LLaMA models and PEFT adapters for the engine's tests (seconds on a CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from modulora.lora import LoraConfig, add_lora_, lora_layers
from modulora.quant import QuantConfig, get_quantizer

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_quantized_llama(vocab_size: int, seed: int = 0, bits: int = 4) -> LlamaForCausalLM:
    """A 2-layer LLaMA (hidden 64, GQA 4:2) whose linears are RTN-quantized GPTQ layers."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    quantizer = get_quantizer(QuantConfig(method="rtn", bits=bits, group_size=32))
    for name, module in list(model.named_modules()):
        parent, _, leaf = name.rpartition(".")
        if leaf in TARGETS:
            setattr(model.get_submodule(parent), leaf, quantizer.quantize(module.weight.data, None, None))
    return model


def random_adapter(
    model: torch.nn.Module, seed: int, r: int = 4, targets: str | list[str] = "all-linear"
) -> None:
    """Wrap `model` with LoRA (library `add_lora_`) and give A and B random values (B is zero at init)."""
    add_lora_(model, LoraConfig(r=r, alpha=2 * r, dropout=0.0, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        for weight in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            weight.data = torch.randn(weight.shape, generator=generator) * 0.2


def write_peft_adapter(model: torch.nn.Module, folder: Path, r: int) -> Path:
    """Save the LoRA of a model wrapped by `random_adapter` as PEFT files."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, layer in lora_layers(model).items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A["default"].weight.data.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B["default"].weight.data.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r,
        "use_rslora": False,
        "target_modules": list(TARGETS),
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder
