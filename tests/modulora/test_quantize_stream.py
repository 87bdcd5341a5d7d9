"""Streaming quantization: the model never whole in memory, and the same bytes as the in-memory path."""

import json

import pytest
import torch

from modulora.models import load_model, save_quantized
from modulora.quant import QuantConfig
from modulora.quantize import CALIBRATION_SIZES, load_calibration, quantize_, quantize_model
from modulora.weights import SafetensorsSource, ShardWriter

# Bit-identity compares two runs of the same kernels, so on a CPU every test here runs on one thread
# (`single_thread`, autouse): a multi-threaded BLAS on a loaded machine may split a reduction
# differently from one call to the next.
from tests.utils.tiny_lm import CORPUS, single_thread, tiny_llama, tiny_tokenizer  # noqa: F401


def saved_tensors(folder) -> dict[str, torch.Tensor]:
    source = SafetensorsSource(folder)
    return source.get_many(sorted(source.keys()))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def in_memory_quantization(ref, config: QuantConfig, out, dtype: torch.dtype, device: str = "cpu"):
    """The path quantize_model took before streaming: load the model whole, quantize_, save."""
    model, tokenizer = load_model(ref, dtype=dtype)
    ids = load_calibration(tokenizer, config.calibration, config.n_samples, config.seq_len, config.seed)
    torch.manual_seed(config.seed)
    quantize_(model, config, ids, device=device)
    return save_quantized(model, tokenizer, config, out, base=str(ref))


@pytest.fixture
def hf_folder(tmp_path):
    folder = tmp_path / "hf"
    tiny_llama().save_pretrained(folder, max_shard_size="100KB")  # sharded, as large models are
    tiny_tokenizer().save_pretrained(folder)
    (tmp_path / "calib.txt").write_text(" ".join(CORPUS * 20))
    return folder


def tiny_config(tmp_path, method: str = "optq") -> QuantConfig:
    return QuantConfig(
        method=method, bits=4, group_size=32, calibration=str(tmp_path / "calib.txt"), n_samples=4, seq_len=16
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_streamed_result_is_bit_identical_to_the_in_memory_path(hf_folder, tmp_path, dtype) -> None:
    config = tiny_config(tmp_path)
    streamed = quantize_model(hf_folder, config, tmp_path / "streamed", dtype=dtype, device="cpu")
    in_memory = in_memory_quantization(hf_folder, config, tmp_path / "in-memory", dtype)
    assert len(list(streamed.glob("*.safetensors"))) > 1  # written as shards
    assert_same_tensors(saved_tensors(streamed), saved_tensors(in_memory))


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_streamed_smollm2_is_bit_identical_to_the_in_memory_path(smollm2, tmp_path, device) -> None:
    """The real model (tied head, 30 layers, fp32 checkpoint read as bf16), OPTQ's default settings
    but for the calibration size (on a CPU the 30 layers take minutes even so)."""
    config = QuantConfig(
        method="optq",
        bits=4,
        n_samples=4 if device == "cpu" else None,
        seq_len=64 if device == "cpu" else None,
    )
    streamed = quantize_model(smollm2, config, tmp_path / "streamed", dtype=torch.bfloat16, device=device)
    recorded = json.loads((streamed / "quantize_config.json").read_text())["modulora"]["quant_config"]
    config.n_samples, config.seq_len = recorded["n_samples"], recorded["seq_len"]  # the device's sizes
    in_memory = in_memory_quantization(smollm2, config, tmp_path / "in-memory", torch.bfloat16, device)
    assert_same_tensors(saved_tensors(streamed), saved_tensors(in_memory))


def test_each_layer_is_read_only_after_the_one_before_is_written(hf_folder, tmp_path, monkeypatch) -> None:
    events: list[tuple[str, str]] = []
    get_many, write = SafetensorsSource.get_many, ShardWriter.write

    def layer_of(names) -> str:
        return ",".join(sorted({n.split(".")[2] if ".layers." in n else n.split(".")[-2] for n in names}))

    def recording_get_many(self, names, device="cpu"):
        events.append(("read", layer_of(names)))
        return get_many(self, names, device)

    def recording_write(self, tensors):
        events.append(("write", layer_of(tensors)))
        return write(self, tensors)

    monkeypatch.setattr(SafetensorsSource, "get_many", recording_get_many)
    monkeypatch.setattr(ShardWriter, "write", recording_write)
    quantize_model(hf_folder, tiny_config(tmp_path), tmp_path / "q", device="cpu")

    layer_events = [e for e in events if e[1] in ("0", "1")]
    assert layer_events == [("read", "0"), ("write", "0"), ("read", "1"), ("write", "1")]
    # The embeddings are read once for calibration, then copied through with the norm and the head.
    assert events[0] == ("read", "embed_tokens")


def test_quantized_folder_loads_onto_the_device_tensor_by_tensor(hf_folder, tmp_path, monkeypatch) -> None:
    out = quantize_model(hf_folder, tiny_config(tmp_path, "rtn"), tmp_path / "q", device="cpu")
    reads: list[int] = []
    get_many = SafetensorsSource.get_many

    def counting_get_many(self, names, device="cpu"):
        reads.append(len(names))
        return get_many(self, names, device)

    monkeypatch.setattr(SafetensorsSource, "get_many", counting_get_many)
    model, _ = load_model(out, dtype=torch.float32)
    assert reads and max(reads) == 1
    # Same logits as a load of the whole state dict into the quantized model.
    reference = quantize_(tiny_llama(), tiny_config(tmp_path, "rtn"))
    ids = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_unset_calibration_size_is_sized_to_the_device_and_recorded(hf_folder, tmp_path) -> None:
    config = QuantConfig(method="optq", bits=4, group_size=32, calibration=str(tmp_path / "calib.txt"))
    out = quantize_model(hf_folder, config, tmp_path / "q", device="cpu")
    recorded = json.loads((out / "quantize_config.json").read_text())["modulora"]["quant_config"]
    assert (recorded["n_samples"], recorded["seq_len"]) == CALIBRATION_SIZES["cpu"]
