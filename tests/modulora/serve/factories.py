"""Small quantized LLaMA models and PEFT adapters for the engine's tests (seconds on a CPU)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modulora.export import export_adapter
from modulora.lora import LoraConfig, add_lora_, lora_layers
from modulora.quant import QuantConfig, get_quantizer
from modulora.quant.quip import E8PLinear

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


def tiny_e8p_llama(vocab_size: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """The 2-layer LLaMA of `tiny_quantized_llama` in `dtype` whose linears are QuIP# E8P layers with
    random codes and real-valued signs (fp32, as after sign tuning): outputs of order 1 for inputs
    of order 1."""
    model = tiny_quantized_llama(vocab_size, seed).to(dtype)
    generator = torch.Generator().manual_seed(seed)
    info = torch.iinfo(torch.int16)
    for name, module in list(model.named_modules()):
        parent, _, leaf = name.rpartition(".")
        if leaf in TARGETS:
            layer = E8PLinear(module.in_features, module.out_features)
            layer.codes.copy_(torch.randint(info.min, info.max + 1, layer.codes.shape, generator=generator))
            layer.su.copy_(torch.randn(layer.in_features, generator=generator))
            layer.sv.copy_(torch.randn(layer.out_features, generator=generator) / layer.in_features**0.5)
            setattr(model.get_submodule(parent), leaf, layer)
    return model


def dense_copy(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """A copy of `model` whose quantized linears are plain `nn.Linear`s of their materialized weights."""
    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        parent, _, leaf = name.rpartition(".")
        if leaf in TARGETS:
            weight = module.materialize(torch.float32)
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=False)
            linear.weight.data = weight.to(module.su.device)
            setattr(dense.get_submodule(parent), leaf, linear)
    return dense


def random_adapter(
    model: torch.nn.Module, seed: int, r: int = 4, targets: str | list[str] = "all-linear"
) -> None:
    """Wrap `model` with LoRA (library `add_lora_`) and give A and B random values (B is zero at init)."""
    add_lora_(model, LoraConfig(r=r, alpha=2 * r, dropout=0.0, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        for weight in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            weight.data = torch.randn(weight.shape, generator=generator) * 0.2


def export_random_adapter(model: torch.nn.Module, folder: Path, r: int, tokenizer: Any = None) -> Path:
    """Export the LoRA of a model wrapped by `random_adapter` with the library (PEFT files + manifest)."""
    targets = sorted({name.rpartition(".")[2] for name in lora_layers(model)})
    config = LoraConfig(r=r, alpha=2 * r, dropout=0.0, target_modules=targets)
    return export_adapter(
        model, folder, base_model="tiny", quant_config=None, lora_config=config, tokenizer=tokenizer
    )
