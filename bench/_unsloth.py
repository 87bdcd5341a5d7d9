"""Unsloth as a training-step peer: its `FastLanguageModel` on the same random LLaMA as PEFT's rows.

Unsloth loads models only through `FastLanguageModel.from_pretrained`, so the bench's random bf16
LLaMA of each size is saved once (safetensors, with a word-level tokenizer it never uses) under a
temporary folder and loaded from there: in bf16 for its LoRA row, quantized to bitsandbytes NF4 at
load for its QLoRA row. Adapters: r=16, alpha 16 on all seven linears like every other row, with
dropout 0 (Unsloth's fast LoRA kernels only run without dropout) and Unsloth's own gradient
checkpointing ("unsloth", which offloads the checkpointed layer inputs to the CPU).

Importing Unsloth patches transformers, PEFT and TRL for the rest of the process, so the benchmark
runs its rows after every other one. The wheels come from `python -m bench.unsloth_wheels DEST`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from bench._models import build_model
from modulora.targets import ALL_LINEAR

_saved: dict[str, Path] = {}


def _word_level_tokenizer() -> object:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def saved_random_llama(size: str) -> Path:
    """A folder holding the bench's random bf16 LLaMA of `size` (the weights PEFT's rows train)."""
    if size not in _saved:
        folder = Path(tempfile.mkdtemp(prefix=f"bench-unsloth-{size}-"))
        torch.manual_seed(0)
        model = build_model(size, "bf16")
        # The longest row (1×4096) within the positions the config declares: past them Unsloth
        # would rescale RoPE, and compute a different model from PEFT's.
        model.config.max_position_embeddings = 4096
        model.save_pretrained(folder)
        _word_level_tokenizer().save_pretrained(folder)
        del model
        torch.cuda.empty_cache()
        _saved[size] = folder
    return _saved[size]


def remove_saved_models() -> None:
    for folder in _saved.values():
        shutil.rmtree(folder, ignore_errors=True)
    _saved.clear()


def unsloth_lora_model(size: str, bits: int, seq: int) -> nn.Module:
    """Unsloth's LoRA (bits=16) or QLoRA (bits=4, bitsandbytes NF4) model of `size`, adapters added."""
    # Nothing outside the GPU machine can be reached: no usage statistics, no Hub look-ups.
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from unsloth import FastLanguageModel
    except ModuleNotFoundError as error:
        raise RuntimeError(f"{error}: carry the wheels of `python -m bench.unsloth_wheels`") from error

    folder = saved_random_llama(size)
    model, _ = FastLanguageModel.from_pretrained(
        str(folder), max_seq_length=seq, dtype=torch.bfloat16, load_in_4bit=bits == 4,
        load_in_16bit=bits == 16, fix_tokenizer=False, use_exact_model_name=True,
    )  # fmt: skip
    return FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=16, lora_dropout=0.0, target_modules=list(ALL_LINEAR),
        use_gradient_checkpointing="unsloth", random_state=0,
    )  # fmt: skip
