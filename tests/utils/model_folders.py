"""Small Hugging Face model folders on disk, for checks that read files only (no model loads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

TINY_LLAMA_CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "vocab_size": 256, "max_position_embeddings": 512, "tie_word_embeddings": True,
}  # fmt: skip
LLAMA_7B_CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
    "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "vocab_size": 32000, "max_position_embeddings": 4096,
}  # fmt: skip


def tiny_llama_tensors(config: dict = TINY_LLAMA_CONFIG) -> dict[str, np.ndarray]:
    """A LLaMA state dict of `config`'s shapes (float16 zeros: only shapes and dtypes matter here)."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    tensors = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        tensors |= {
            f"{prefix}.self_attn.q_proj.weight": (h, h), f"{prefix}.self_attn.k_proj.weight": (kv, h),
            f"{prefix}.self_attn.v_proj.weight": (kv, h), f"{prefix}.self_attn.o_proj.weight": (h, h),
            f"{prefix}.mlp.gate_proj.weight": (i, h), f"{prefix}.mlp.up_proj.weight": (i, h),
            f"{prefix}.mlp.down_proj.weight": (h, i),
            f"{prefix}.input_layernorm.weight": (h,), f"{prefix}.post_attention_layernorm.weight": (h,),
        }  # fmt: skip
    return {name: np.zeros(shape, dtype=np.float16) for name, shape in tensors.items()}


def write_sharded_model(folder: Path, shards: int = 2, config: dict = TINY_LLAMA_CONFIG) -> Path:
    """config.json, `shards` safetensors files with model.safetensors.index.json, and a tokenizer file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    tensors = tiny_llama_tensors(config)
    names = sorted(tensors)
    weight_map = {}
    for index in range(shards):
        file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[index::shards]}
        save_file(part, str(folder / file))
        weight_map |= dict.fromkeys(part, file)
    index_file = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
        "weight_map": weight_map,
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_file))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def write_hf_cache_entry(
    cache_dir: Path, repo_id: str, commit: str = "0123456789abcdef0123456789abcdef01234567"
) -> Path:
    """The layout huggingface_hub's cache gives a downloaded model: refs/main names the snapshot."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return write_sharded_model(repo / "snapshots" / commit)
