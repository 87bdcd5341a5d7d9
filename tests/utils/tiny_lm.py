"""Tiny stand-ins for a real LLaMA-family model: a byte-level BPE tokenizer with a ChatML template
and a randomly initialized 2-layer `LlamaForCausalLM` with grouped-query attention."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from modulora.data import DEFAULT_CHAT_TEMPLATE

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "Question: Who wrote Hamlet?\nType: human",
    "Below is an instruction that describes a task.",
    "Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n",
    "user assistant system hello world numbers 0123456789 location entity description abbreviation",
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@functools.cache
def _tokenizer_json() -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    return tokenizer.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A ~400-token byte-level BPE tokenizer: EOS `<|im_end|>`, pad `<|endoftext|>`, ChatML template."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
        chat_template=DEFAULT_CHAT_TEMPLATE,
    )


def tiny_llama(vocab_size: int = 400, seed: int = 0) -> LlamaForCausalLM:
    """A random 2-layer LLaMA (hidden 64, 4 query heads, 2 key/value heads), float32, eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=0.1,  # logits large enough that a small adapter can move them
    )
    return LlamaForCausalLM(config).eval()


def quantize_rtn_(model: torch.nn.Module, bits: int = 4, group_size: int = 32) -> torch.nn.Module:
    """Replace every linear layer inside the decoder layers by its round-to-nearest `QuantizedLinear`."""
    from modulora.quant import QuantConfig, get_quantizer

    quantizer = get_quantizer(QuantConfig(method="rtn", bits=bits, group_size=group_size))
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            parent, _, leaf = name.rpartition(".")
            setattr(
                model.get_submodule(parent), leaf, quantizer.quantize(module.weight.data, module.bias, None)
            )
    return model


def with_trained_lora_(model: torch.nn.Module, lora: object, seed: int) -> torch.nn.Module:
    """Add LoRA adapters as a trained run leaves them: B non-zero (a fresh adapter's B is zero)."""
    from modulora.lora import add_lora_

    add_lora_(model, lora)
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """Tiny matmuls on a shared, oversubscribed CPU run tens of times faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
