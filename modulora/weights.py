"""A checkpoint's tensors one at a time: read from safetensors shards, written as shards.

Streaming quantization and the loading of quantized bases hold one decoder layer in host memory,
never the model: `SafetensorsSource` maps each tensor name to its file (from the shards' headers)
and opens the file only while that tensor is read, so no mapping of a multi-GB shard stays resident;
`ShardWriter` writes each group of tensors it is given as one shard and, when closed, names the
shards `model-0000i-of-0000n.safetensors` and writes `model.safetensors.index.json`, as
`transformers`' `save_pretrained` does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

INDEX_FILE = "model.safetensors.index.json"


def tied_aliases(config: object) -> dict[str, str]:
    """A tied embedding and head are one tensor, which a checkpoint may store under either name."""
    if not getattr(config, "tie_word_embeddings", False):
        return {}
    return {"model.embed_tokens.weight": "lm_head.weight", "lm_head.weight": "model.embed_tokens.weight"}


class SafetensorsSource:
    """The tensors of a folder of `*.safetensors` files (one, or shards with or without an index).

    aliases: {name: other name} for tensors that may be stored under another name; tied weights,
    which a checkpoint keeps once (safetensors' `save_model` keeps the head, not the embedding).
    """

    def __init__(self, folder: str | os.PathLike[str], aliases: dict[str, str] | None = None) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        self.aliases = aliases or {}
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"model: no *.safetensors in {self.folder}")
        self.file_of: dict[str, Path] = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                self.file_of.update(dict.fromkeys(f.keys(), file))

    def keys(self) -> set[str]:
        return set(self.file_of)

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """One tensor, as stored, on `device` (a GPU tensor passes through host memory alone)."""
        return self.get_many([name], device)[name]

    def get_many(self, names: list[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Several tensors, each file opened once; they are held until returned, so pass one layer's."""
        from safetensors import safe_open

        by_file: dict[Path, list[tuple[str, str]]] = {}
        for name in names:
            stored = name if name in self.file_of else self.aliases.get(name, name)
            if stored not in self.file_of:
                raise KeyError(f"model: {self.folder} has no tensor {name!r}")
            by_file.setdefault(self.file_of[stored], []).append((name, stored))
        tensors = {}
        for file, file_names in by_file.items():
            with safe_open(file, framework="pt") as f:  # closed (unmapped) before the next file
                for name, stored in file_names:
                    tensors[name] = f.get_tensor(stored).to(device)
        return tensors


class ShardWriter:
    """Writes tensors into numbered safetensors shards in `folder`; `close()` names them and writes
    the index. Each `write` is one shard, so the caller decides how much is in memory at once."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_size = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if not tensors:
            return
        path = self.folder / f"model-{len(self.shards) + 1:05d}.safetensors"
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(cpu, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(cpu)))
        self.total_size += sum(t.numel() * t.element_size() for t in cpu.values())

    def close(self) -> None:
        weight_map = {}
        for i, (path, names) in enumerate(self.shards):
            final = path.with_name(f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors")
            path.rename(final)
            weight_map.update(dict.fromkeys(names, final.name))
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
