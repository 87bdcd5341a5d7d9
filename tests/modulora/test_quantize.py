"""Layer-by-layer quantization: OPTQ beats RTN on the model output; one layer at a time on the device."""

import json

import pytest
import torch

from modulora.models import is_quantized_dir, load_model
from modulora.quant import QuantConfig, QuantizedLinear
from modulora.quantize import decoder_layers, load_calibration, quantize_, quantize_model
from tests.utils.tiny_lm import CORPUS, tiny_llama, tiny_tokenizer


def calibration_ids(n: int = 8, seq_len: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 400, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def output_error(config: QuantConfig, ids: torch.Tensor) -> float:
    reference = tiny_llama()
    quantized = quantize_(tiny_llama(), config, ids)
    with torch.no_grad():
        return ((quantized(ids).logits - reference(ids).logits) ** 2).mean().item()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_optq_reconstructs_the_model_output_better_than_rtn(bits: int) -> None:
    ids = calibration_ids()
    optq = output_error(QuantConfig(method="optq", bits=bits, group_size=32), ids)
    rtn = output_error(QuantConfig(method="rtn", bits=bits, group_size=32), ids)
    assert optq < rtn


def test_every_decoder_projection_is_quantized_and_nothing_else() -> None:
    model = quantize_(tiny_llama(), QuantConfig(method="rtn", bits=4, group_size=32))
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == 2 * 7
    assert all(".layers." in n for n in quantized)
    assert isinstance(model.lm_head, torch.nn.Linear)


def test_layers_visit_the_device_one_at_a_time() -> None:
    """Each layer moves to the device, runs only while there, and moves back before the next one moves."""
    model = tiny_llama()
    events: list[tuple[str, int]] = []
    for index, layer in enumerate(decoder_layers(model)):
        move = layer.to

        def recording_to(*args, _move=move, _index=index, **kwargs):
            events.append(("to", _index))
            return _move(*args, **kwargs)

        layer.to = recording_to
        layer.register_forward_pre_hook(lambda module, args, _index=index: events.append(("run", _index)))

    quantize_(model, QuantConfig(method="optq", bits=4, group_size=32), calibration_ids(), device="cpu")

    moves = [i for kind, i in events if kind == "to"]
    assert moves == [0, 0, 1, 1]  # in, out, in, out
    first_out = events.index(("to", 0), events.index(("to", 0)) + 1)
    assert {i for kind, i in events[:first_out] if kind == "run"} == {0}
    assert {i for kind, i in events[first_out:] if kind == "run"} == {1}


def test_progress_reports_each_layer() -> None:
    seen = []
    quantize_(
        tiny_llama(),
        QuantConfig(method="nf4", bits=4),
        progress=lambda done, total: seen.append((done, total)),
    )
    assert seen == [(1, 2), (2, 2)]


def test_optq_without_calibration_names_the_missing_argument() -> None:
    with pytest.raises(ValueError, match="calibration_ids"):
        quantize_(tiny_llama(), QuantConfig(method="optq"))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".txt"])
def test_calibration_windows_come_from_each_file_kind(tmp_path, suffix: str) -> None:
    texts = [" ".join(CORPUS * 3)] * 4
    path = tmp_path / f"calibration{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    elif suffix == ".json":
        path.write_text(json.dumps([{"text": t} for t in texts]))
    else:
        path.write_text("\n".join(texts))
    tokenizer = tiny_tokenizer()
    ids = load_calibration(tokenizer, path, n_samples=6, seq_len=24, seed=3)
    assert ids.shape == (6, 24)
    torch.testing.assert_close(ids, load_calibration(tokenizer, path, n_samples=6, seq_len=24, seed=3))


def test_calibration_rows_without_text_name_the_field(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"content": "x"}))
    with pytest.raises(ValueError, match="'text'"):
        load_calibration(tiny_tokenizer(), path)


def test_quantize_model_writes_a_loadable_folder(tmp_path) -> None:
    source = tmp_path / "hf"
    tiny_llama().save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    (tmp_path / "calib.txt").write_text(" ".join(CORPUS * 20))
    config = QuantConfig(method="optq", bits=3, group_size=32, calibration=str(tmp_path / "calib.txt"),
                         n_samples=4, seq_len=16)  # fmt: skip
    out = quantize_model(source, config, tmp_path / "q")
    assert is_quantized_dir(out)
    model, _ = load_model(out)
    assert model.model.layers[1].mlp.down_proj.bits == 3


def test_an_already_quantized_base_is_requantized_from_its_materialized_weights() -> None:
    gguf_base = quantize_(tiny_llama(), QuantConfig(method="gguf", bits=8))
    expected = gguf_base.model.layers[0].mlp.up_proj.materialize(torch.float32)
    requantized = quantize_(gguf_base, QuantConfig(method="rtn", bits=8, group_size=32))
    # RTN 8-bit of the materialized Q8_0 weights: within half a step (range/255/2) of them.
    up = requantized.model.layers[0].mlp.up_proj
    assert up.format == "gptq"
    assert (up.materialize(torch.float32) - expected).abs().max() <= (expected.max() - expected.min()) / 255
