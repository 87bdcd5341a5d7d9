"""The synthetic checkpoint is a Hugging Face folder that transformers loads as the shape it claims."""

import json

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.synthetic_checkpoint import SHAPES, write_synthetic_llama


def test_tiny_checkpoint_loads_with_its_shape_sharded_and_reproducible(tmp_path, smollm2) -> None:
    folder = write_synthetic_llama(tmp_path / "a", "tiny", smollm2, seed=0, shard_bytes=2**20)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2  # 1 MiB shards: the embedding, the layers and the head land apart

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    hidden, intermediate, layers, heads = SHAPES["tiny"]
    assert (model.config.hidden_size, model.config.intermediate_size) == (hidden, intermediate)
    assert (model.config.num_hidden_layers, model.config.num_attention_heads) == (layers, heads)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.vocab_size == len(tokenizer)
    state = model.state_dict()
    assert set(index["weight_map"]) == set(state)  # the head is its own tensor, as in LLaMA
    assert torch.equal(state["model.norm.weight"], torch.ones(hidden, dtype=torch.bfloat16))
    q = state["model.layers.0.self_attn.q_proj.weight"].float()
    assert abs(q.std().item() - 0.02) < 0.002
    ids = tokenizer("Hello there", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()

    again = write_synthetic_llama(tmp_path / "b", "tiny", smollm2, seed=0, shard_bytes=2**20)
    other = write_synthetic_llama(tmp_path / "c", "tiny", smollm2, seed=1, shard_bytes=2**20)
    name = "model.layers.1.mlp.down_proj.weight"
    shard = index["weight_map"][name]

    def read(root):
        with safe_open(root / shard, framework="pt") as f:
            return f.get_tensor(name)

    assert torch.equal(read(folder), read(again))
    assert not torch.equal(read(folder), read(other))
