"""Find a user's model and check its folder before anything loads it (torch-free).

A base model of the service is a name mapped to a *source* (`MODULORA_BASE_MODELS`): a folder on
disk, or a Hugging Face id (`org/name`) already in the local Hugging Face cache, which
`find_model` resolves to its snapshot folder without a network. `check_model` then reads only
small files and safetensors headers, so a folder that is not a model, a checkpoint whose index
names a shard that is not there, or a truncated shard is refused with a message naming the
problem, before a worker quantizes or an engine loads anything onto a GPU. `weights_bytes` sizes
a folder's weights from the same headers.

Every error is a `ModelFolderError` (a ValueError) whose message starts with `model:`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

CONFIG = "config.json"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Element sizes of safetensors' dtype names (the header's "dtype" field).
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
_FLOATING = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


class ModelFolderError(ValueError):
    """A model source that cannot be used; the message says which and why."""


def find_model(source: str, hf_cache_dir: str | Path | None = None) -> Path:
    """The folder (or .gguf file) that `source` names: a path that exists, else a Hugging Face id
    (`org/name`) resolved from the local cache (`hf_cache_dir`, default HF_HUB_CACHE), offline."""
    path = Path(source).expanduser()
    if path.exists():
        return path.resolve()
    if not _HF_ID.fullmatch(source):
        raise ModelFolderError(
            f"model: {source!r} does not exist (a model folder or a Hugging Face id org/name)"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source, cache_dir=hf_cache_dir, local_files_only=True))
    except LocalEntryNotFoundError:
        raise ModelFolderError(
            f"model: {source!r} is neither a folder nor in the local Hugging Face cache; download it "
            f"first (`hf download {source}`) or map the name to a folder"
        ) from None


def check_model(path: Path) -> None:
    """Refuse what cannot load as a model: a missing path, a GGUF file without GGUF's magic, a
    folder without config.json, weights or tokenizer, or with missing or unreadable shards."""
    if not path.exists():
        raise ModelFolderError(f"model: {path} does not exist")
    gguf = gguf_file(path)
    if gguf is not None:
        with gguf.open("rb") as file:
            if file.read(4) != b"GGUF":
                raise ModelFolderError(f"model: {gguf} is not a GGUF file (it does not start with 'GGUF')")
        return
    if not path.is_dir():
        raise ModelFolderError(f"model: {path} is neither a model folder nor a .gguf file")
    config = read_config(path)
    if not isinstance(config.get("model_type"), str):
        raise ModelFolderError(
            f"model: {path / CONFIG} has no model_type; it is not a Hugging Face model config"
        )
    for shard in weight_shards(path):
        _tensor_header(shard)  # raises on a truncated or foreign file
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelFolderError(f"model: {path} has no tokenizer ({' or '.join(TOKENIZER_FILES)})")


def gguf_file(path: Path) -> Path | None:
    """The GGUF model `path` is (a .gguf file, or a folder without config.json holding one)."""
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if path.is_dir() and not (path / CONFIG).exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise ModelFolderError(f"model: {path} holds several GGUF files ({names}); name one of them")
        return found[0] if found else None
    return None


def read_config(path: Path) -> dict[str, Any]:
    """The folder's config.json as a dict."""
    file = path / CONFIG
    if not file.is_file():
        raise ModelFolderError(
            f"model: {path} is not a model folder: it has no {CONFIG} (a Hugging Face model folder holds "
            "config.json, *.safetensors and the tokenizer files)"
        )
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"model: {file} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelFolderError(f"model: {file} is not a JSON object")
    return config


def weight_shards(path: Path) -> list[Path]:
    """The safetensors files of a model folder: those its index names (every one must exist),
    else every `*.safetensors` in it."""
    index = path / WEIGHTS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelFolderError(f"model: {index} is not a safetensors index ({e!r})") from None
        names = sorted(set(weight_map.values()))
        missing = [name for name in names if not (path / name).is_file()]
        if missing:
            raise ModelFolderError(
                f"model: {path} is missing {len(missing)} of its {len(names)} weight shards named by "
                f"{WEIGHTS_INDEX}: {', '.join(missing)}"
            )
        return [path / name for name in names]
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        found = (
            f"; it has only PyTorch weights ({', '.join(others[:3])}): save them as safetensors"
            if others
            else ""
        )
        raise ModelFolderError(f"model: {path} has no *.safetensors weights{found}")
    return shards


def _tensor_header(shard: Path) -> dict[str, dict[str, Any]]:
    """{tensor name: {"dtype", "shape"}} from the shard's header, checked against its size."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(shard, framework="numpy") as file:
            return {
                name: {"dtype": file.get_slice(name).get_dtype(), "shape": file.get_slice(name).get_shape()}
                for name in file.keys()  # noqa: SIM118 (safe_open has no __iter__)
            }
    except (SafetensorError, OSError) as e:
        raise ModelFolderError(f"model: {shard} is not a readable safetensors file ({e})") from None


def weights_bytes(path: Path, dense_bytes: int) -> int:
    """Bytes the folder's tensors take once loaded with floating tensors cast to `dense_bytes` per
    element (how the engine loads a base: packed integer codes keep theirs; scales are counted at
    the dense size too)."""
    total = 0
    for shard in weight_shards(path):
        for tensor in _tensor_header(shard).values():
            numel = 1
            for size in tensor["shape"]:
                numel *= size
            dtype = tensor["dtype"].upper()
            total += numel * (dense_bytes if dtype in _FLOATING else _DTYPE_BYTES.get(dtype, 4))
    return total
