"""Random-weight LLaMA-shaped Hugging Face checkpoints on disk, for benchmarks of the real load path.

`write_synthetic_llama(out_dir, shape, tokenizer_dir)` writes what a user's checkpoint folder holds:
config.json, bf16 weights in sharded safetensors with `model.safetensors.index.json`, and the
tokenizer files (SmolLM2's: `smollm2_tokenizer_dir()`). The vocabulary is the tokenizer's, so text
round-trips; the other dimensions are LLaMA-1's for "7b", "13b" and "65b" ("tiny": a few MB).

The writer holds one chunk of one tensor at a time (the safetensors header is computed from the
shapes first, then each tensor's bytes are streamed after it), so writing a 65B checkpoint (130 GB)
needs well under a GiB of RAM. `safetensors.torch.save_file` would need each whole shard in memory.

    python -m bench.synthetic_checkpoint --shape 7b --out /tmp/llama-7b
"""

from __future__ import annotations

import argparse
import json
import os
import struct
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

# (hidden, intermediate, layers, attention heads): LLaMA-1's dimensions.
SHAPES = {
    "tiny": (128, 384, 2, 4),
    "7b": (4096, 11008, 32, 32),
    "13b": (5120, 13824, 40, 40),
    "65b": (8192, 22016, 80, 64),
}
DEFAULT_SHARD_BYTES = 2 * 2**30
WEIGHT_STD = 0.02  # the initializer range LLaMA was trained from; keeps activations finite in bf16
CHUNK_ELEMENTS = 2**24  # 32 MiB of bf16 generated and written at a time
INDEX_FILE = "model.safetensors.index.json"


def smollm2_tokenizer_dir() -> Path:
    """SmolLM2-135M-Instruct's tokenizer files: the folder $BENCH_TOKENIZER_DIR names when set (a GPU
    machine the built-in model's 94 MB package has not reached), else the built-in model's folder,
    converted from its GGUF once."""
    if folder := os.environ.get("BENCH_TOKENIZER_DIR"):
        return Path(folder)
    from modulora.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


def synthetic_config(shape: str, tokenizer: object) -> LlamaConfig:
    """A LLaMA config of `shape` whose vocabulary and special tokens are the tokenizer's."""
    if shape not in SHAPES:
        raise ValueError(f"shape: {shape!r} is not one of {sorted(SHAPES)}")
    hidden, intermediate, layers, heads = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,  # type: ignore[attr-defined]
        eos_token_id=tokenizer.eos_token_id,  # type: ignore[attr-defined]
    )
    config.dtype = torch.bfloat16
    return config


def tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every saved tensor's name and shape, in the model's order (taken from a meta-device model)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _shards(shapes: dict[str, tuple[int, ...]], shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped greedily into shards of at most `shard_bytes` (one tensor may exceed it)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * _numel(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def _write_shard(
    path: Path, names: list[str], shapes: dict[str, tuple[int, ...]], seeds: dict[str, int]
) -> None:
    """One safetensors file (format: 8-byte header length, JSON header, raw little-endian data)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        end = offset + 2 * _numel(shapes[name])
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, end]}
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name in names:
            _write_tensor(f, name, shapes[name], seeds[name])


def _write_tensor(f: object, name: str, shape: tuple[int, ...], seed: int) -> None:
    """Norm weights are ones; every other tensor N(0, WEIGHT_STD), generated row chunk by row chunk."""
    rows, cols = (shape[0], _numel(shape[1:])) if len(shape) > 1 else (1, shape[0])
    generator = torch.Generator().manual_seed(seed)
    step = max(1, CHUNK_ELEMENTS // cols)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        if name.endswith("norm.weight"):
            chunk = torch.ones(n, cols, dtype=torch.bfloat16)
        else:
            chunk = torch.randn(n, cols, generator=generator).mul_(WEIGHT_STD).to(torch.bfloat16)
        f.write(chunk.view(torch.int16).numpy().tobytes())  # type: ignore[attr-defined]


def write_synthetic_llama(
    out_dir: str | os.PathLike[str],
    shape: str,
    tokenizer_dir: str | os.PathLike[str],
    seed: int = 0,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write a random bf16 LLaMA of `shape` as a Hugging Face folder in `out_dir`; returns it.

    The weights are a function of (shape, seed): tensor i is drawn from a generator seeded with
    seed * 1_000_003 + i, so two calls write the same bytes.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = synthetic_config(shape, tokenizer)
    shapes = tensor_shapes(config)
    seeds = {name: seed * 1_000_003 + i for i, name in enumerate(shapes)}
    shards = _shards(shapes, shard_bytes)
    weight_map = {}
    for i, names in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(out_dir / filename, names, shapes, seeds)
        weight_map.update(dict.fromkeys(names, filename))
    index = {
        "metadata": {"total_size": sum(2 * _numel(s) for s in shapes.values())},
        "weight_map": weight_map,
    }
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", required=True, help="folder to write (created)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-gib", type=float, default=DEFAULT_SHARD_BYTES / 2**30)
    args = parser.parse_args()
    out = write_synthetic_llama(
        args.out, args.shape, smollm2_tokenizer_dir(), args.seed, int(args.shard_gib * 2**30)
    )
    print(out)


if __name__ == "__main__":
    main()
