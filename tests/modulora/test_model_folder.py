"""modulora/model_folder.py: finding a model by folder or Hugging Face cache id, and refusing a
folder that cannot load, from its files alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modulora.model_folder import ModelFolderError, check_model, find_model, weights_bytes
from tests.utils.model_folders import (
    tiny_llama_tensors,
    write_hf_cache_entry,
    write_sharded_model,
)


def test_a_complete_sharded_folder_passes(tmp_path: Path) -> None:
    check_model(write_sharded_model(tmp_path / "llama"))


def test_find_model_returns_an_existing_folder(tmp_path: Path) -> None:
    folder = write_sharded_model(tmp_path / "llama")
    assert find_model(str(folder)) == folder.resolve()


def test_find_model_resolves_a_hugging_face_id_from_the_local_cache_offline(tmp_path: Path) -> None:
    snapshot = write_hf_cache_entry(tmp_path / "hub", "acme/tiny-llama")
    assert find_model("acme/tiny-llama", hf_cache_dir=tmp_path / "hub") == snapshot


def test_find_model_says_how_to_get_an_id_missing_from_the_cache(tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="'acme/absent' is neither a folder nor in the local Hugging"):
        find_model("acme/absent", hf_cache_dir=tmp_path / "hub")
    with pytest.raises(ModelFolderError, match="does not exist"):
        find_model(str(tmp_path / "nowhere" / "deep" / "x"))


def test_folder_without_config_is_not_a_model(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ModelFolderError, match=r"photos is not a model folder: it has no config\.json"):
        check_model(folder)


def test_config_without_model_type_is_not_a_model(tmp_path: Path) -> None:
    folder = write_sharded_model(tmp_path / "llama")
    (folder / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ModelFolderError, match="has no model_type"):
        check_model(folder)


def test_missing_shard_named_by_the_index_is_named(tmp_path: Path) -> None:
    folder = write_sharded_model(tmp_path / "llama", shards=3)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(
        ModelFolderError, match=r"missing 1 of its 3 weight shards .*: model-00002-of-00003\.safetensors"
    ):
        check_model(folder)


def test_truncated_shard_is_named(tmp_path: Path) -> None:
    folder = write_sharded_model(tmp_path / "llama")
    shard = folder / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(
        ModelFolderError, match="model-00001-of-00002.safetensors is not a readable safetensors"
    ):
        check_model(folder)


def test_pytorch_bin_weights_are_refused_with_what_to_do(tmp_path: Path) -> None:
    folder = write_sharded_model(tmp_path / "llama")
    (folder / "model.safetensors.index.json").unlink()
    for shard in folder.glob("*.safetensors"):
        shard.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(
        ModelFolderError, match=r"only PyTorch weights \(pytorch_model\.bin\): save them as safetensors"
    ):
        check_model(folder)


def test_folder_without_tokenizer_is_refused(tmp_path: Path) -> None:
    folder = write_sharded_model(tmp_path / "llama")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelFolderError, match="has no tokenizer"):
        check_model(folder)


def test_gguf_file_must_start_with_the_gguf_magic(tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    check_model(tmp_path / "model.gguf")
    check_model(tmp_path)  # a folder holding one .gguf and no config.json
    (tmp_path / "model.gguf").write_bytes(b"<html>404</html>")
    with pytest.raises(ModelFolderError, match="is not a GGUF file"):
        check_model(tmp_path / "model.gguf")
    (tmp_path / "model-q8.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelFolderError, match=r"several GGUF files \(model-q8.gguf, model.gguf\); name one"):
        check_model(tmp_path)


def test_weights_bytes_counts_every_tensor_at_the_dense_size(tmp_path: Path) -> None:
    folder = write_sharded_model(tmp_path / "llama")
    elements = sum(t.size for t in tiny_llama_tensors().values())
    assert weights_bytes(folder, dense_bytes=2) == 2 * elements  # stored float16, loaded as bf16
    assert weights_bytes(folder, dense_bytes=4) == 4 * elements


def test_loading_a_folder_with_a_missing_shard_names_it_before_reading_weights(tmp_path: Path) -> None:
    from modulora.models import load_model

    folder = write_sharded_model(tmp_path / "llama", shards=3)
    (folder / "model-00001-of-00003.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="missing 1 of its 3 weight shards"):
        load_model(folder)
