"""Random LLaMA-shaped models for the training-step benchmark, built without dense fp16 weights.

The model is created on the meta device, its targeted linears are swapped for packed layers (GPTQ,
NF4 or QuIP#'s E8P) and only then is memory allocated, so a 65B model at 2 bits never holds its 130 GB of
bf16 weights. Peers (PEFT LoRA in bf16, PEFT + bitsandbytes NF4) get dense bf16 weights first.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from bench._common import random_gptq_buffers
from modulora.quant.gptq_packed import GPTQLinear
from modulora.quant.nf4 import NF4Linear
from modulora.quant.quip import E8PLinear
from modulora.targets import ALL_LINEAR

# CUDA for measurements; BENCH_DEVICE=cpu runs the same code on a tiny model as a smoke test.
DEVICE = os.environ.get("BENCH_DEVICE", "cuda")

# LLaMA-1 shapes (hidden, intermediate, layers, heads); vocabulary 32000.
LLAMA_SIZES = {
    "micro": (64, 160, 2, 2),  # loss parity under Triton's CPU interpreter
    "tiny": (256, 688, 4, 4),
    "7b": (4096, 11008, 32, 32),
    "13b": (5120, 13824, 40, 40),
    "30b": (6656, 17920, 60, 52),
    "65b": (8192, 22016, 80, 64),
}


def llama_config(size: str) -> LlamaConfig:
    hidden, inter, layers, heads = LLAMA_SIZES[size]
    return LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, vocab_size=1000 if size in ("micro", "tiny") else 32000,
        max_position_embeddings=2048, use_cache=False, attn_implementation="sdpa",
    )  # fmt: skip


def _swap_linears(model: nn.Module, make: Any) -> None:
    for name, module in list(model.named_modules()):
        parent, _, leaf = name.rpartition(".")
        if leaf in ALL_LINEAR and isinstance(module, nn.Linear):
            setattr(model.get_submodule(parent), leaf, make(module))


@torch.no_grad()
def _init_dense(model: nn.Module, config: LlamaConfig) -> None:
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02)
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(DEVICE)


@torch.no_grad()
def _init_packed(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, GPTQLinear):
            bufs = random_gptq_buffers(module.in_features, module.out_features, module.bits, 128, DEVICE)
            for key, value in bufs.items():
                getattr(module, key).copy_(value)
        elif isinstance(module, NF4Linear):
            module.packed.random_(0, 256)
            module.absmax.uniform_(0.03, 0.06)  # NF4 levels in [-1, 1] times absmax: W std ~0.02
        elif isinstance(module, E8PLinear):
            info = torch.iinfo(torch.int16)
            module.codes.random_(info.min, info.max + 1)
            # E8P points have entries of order 1 and the Hadamard transforms are orthonormal.
            module.su.copy_(torch.randint(0, 2, module.su.shape, device=DEVICE) * 2.0 - 1)
            module.sv.copy_((torch.randint(0, 2, module.sv.shape, device=DEVICE) * 2.0 - 1) * 0.02)


def build_model(size: str, method: str, bits: int = 4, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A LLaMA of `size` in `dtype` on CUDA whose seven linears per layer are stored as `method` wants.

    method: "gptq" (ModuLoRA packed ints, group 128, no act-order), "nf4" (ModuLoRA with NF4
    storage), "e8p" (ModuLoRA on QuIP#'s 2-bit E8P codes), "bf16" (dense, for PEFT LoRA) or
    "bnb-nf4" (bitsandbytes Linear4bit, for QLoRA).
    """
    config = llama_config(size)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    if method == "gptq":
        _swap_linears(model, lambda m: GPTQLinear(m.in_features, m.out_features, bits, 128))
    elif method == "nf4":
        _swap_linears(model, lambda m: NF4Linear(m.in_features, m.out_features))
    elif method == "e8p":
        _swap_linears(model, lambda m: E8PLinear(m.in_features, m.out_features))
    elif method not in ("bf16", "bnb-nf4"):
        raise ValueError(f"method: {method!r} is not one of gptq, nf4, e8p, bf16, bnb-nf4")
    model.to_empty(device=DEVICE)
    _init_dense(model, config)
    _init_packed(model)
    if method == "bnb-nf4":
        _quantize_bnb_(model)
    return model


def _quantize_bnb_(model: nn.Module) -> None:
    """Replace each bf16 linear by bitsandbytes' NF4 Linear4bit (double-quantized, as QLoRA does)."""
    import bitsandbytes as bnb

    def make(linear: nn.Linear) -> nn.Module:
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=False, compute_dtype=torch.bfloat16,
            compress_statistics=True, quant_type="nf4", device="meta",
        )  # fmt: skip
        weight = bnb.nn.Params4bit(
            linear.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
        )
        layer.weight = weight.to(DEVICE)
        return layer

    _swap_linears(model, make)
    model.is_loaded_in_4bit = True  # PEFT dispatches to its bitsandbytes LoRA layer on this flag
