"""The `modulora` command: parser, extension point, and the whole flow on the real SmolLM2 (CPU)."""

import argparse
import json
import math
import re
from pathlib import Path

import pytest
from utils.tiny_lm import single_thread  # noqa: F401

from modulora import cli


def test_quantize_method_choices_come_from_the_registry() -> None:
    from modulora.quant import QUANTIZERS

    parser = cli.build_parser()
    for method in QUANTIZERS:
        args = parser.parse_args(["quantize", "--model", "m", "--method", method, "--out", "o"])
        assert args.method == method and args.func is cli.run_quantize
    with pytest.raises(SystemExit):
        parser.parse_args(["quantize", "--model", "m", "--method", "no-such-method", "--out", "o"])


def test_entry_point_subcommands_are_registered(monkeypatch) -> None:
    def register_hello(subparsers: argparse._SubParsersAction) -> None:
        subparsers.add_parser("hello").set_defaults(func=lambda args: 7)

    class FakeEntryPoint:
        def load(self):
            return register_hello

    monkeypatch.setattr(
        cli.importlib.metadata,
        "entry_points",
        lambda group: [FakeEntryPoint()] if group == cli.ENTRY_POINT_GROUP else [],
    )
    assert cli.main(["hello"]) == 7


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--model", "no-such-model", "--prompt", "Hi"],
            "generate: ValueError: model: 'no-such-model' is not",
        ),
        (
            ["--model", "m", "--prompt", "Hi", "--temperature", "3"],
            "generate: temperature: 3.0 must be in [0, 2]",
        ),
        (["--model", "m", "--prompt", "Hi", *["--stop", "x"] * 5], "generate: stop: at most 4"),
    ],
)
def test_generate_reports_bad_input_as_a_message(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=re.escape(message)):
        cli.main(["generate", *argv, "--device", "cpu"])


@pytest.mark.parametrize("task", cli.EVAL_TASKS)
def test_eval_without_data_says_what_to_pass(task: str) -> None:
    """No evaluation data ships with the library: the message names what the task reads."""
    with pytest.raises(SystemExit, match=re.escape(f"--data: --task {task} needs {cli.EVAL_DATA[task]}")):
        cli.main(["eval", "--model", "smollm2-135m-instruct", "--task", task, "--device", "cpu"])


def modulora(*args: str) -> int:
    """Run the command in-process, on the CPU."""
    return cli.main([*map(str, args), "--device", "cpu"])


@pytest.mark.slow
def test_cli_flow_quantize_finetune_generate_eval_on_smollm2(tmp_path: Path, capsys, shared_datasets) -> None:
    base, run = tmp_path / "base", tmp_path / "run"
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in cli.DEMO_ROWS))

    assert (
        modulora(
            "quantize",
            "--model",
            "smollm2-135m-instruct",
            "--method",
            "rtn",
            "--bits",
            4,
            "--group-size",
            64,
            "--out",
            base,
        )
        == 0
    )
    assert (base / "quantize_config.json").is_file()

    assert (
        modulora(
            "finetune",
            "--model",
            base,
            "--data",
            data,
            "--max-steps",
            2,
            "--micro-batch-size",
            2,
            "--learning-rate",
            "1e-3",
            "--lora-r",
            4,
            "--max-seq-len",
            48,
            "--out",
            run,
        )
        == 0
    )
    manifest = json.loads((run / "adapter" / "manifest.json").read_text())
    assert manifest["base_model"] == str(base) and manifest["quantization"]["method"] == "rtn"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    capsys.readouterr()

    prompt = "Question: Who wrote Hamlet?\nType:"
    assert (
        modulora("generate", "--model", base, "--adapter", run, "--max-new-tokens", 3, "--prompt", prompt)
        == 0
    )
    assert capsys.readouterr().out.strip()

    wiki = tmp_path / "wiki.txt"
    wiki.write_text((shared_datasets / "wikitext2" / "wiki.test.raw").read_text()[:3000])
    assert (
        modulora(
            "eval", "--model", base, "--adapter", run, "--task", "perplexity", "--data", wiki, "--window", 128
        )
        == 0
    )
    value = float(re.search(r"^perplexity: (\S+)$", capsys.readouterr().out, re.M).group(1))
    assert math.isfinite(value) and 1 < value < 1000

    choices = [" human", " location", " number", " abbreviation"]
    rows = tmp_path / "choices.jsonl"
    labelled = [{"prompt": r["prompt"], "choices": choices, "label": r["completion"]} for r in cli.DEMO_ROWS]
    rows.write_text("".join(json.dumps(row) + "\n" for row in labelled))
    assert modulora("eval", "--model", base, "--adapter", run, "--task", "accuracy", "--data", rows) == 0
    accuracy = float(re.search(r"^accuracy: (\S+)$", capsys.readouterr().out, re.M).group(1))
    assert 0 <= accuracy <= 1


def test_finetune_runs_from_a_config_file_with_later_options_overriding_it(tmp_path: Path, capsys) -> None:
    from utils.tiny_lm import tiny_llama, tiny_tokenizer

    from modulora.tracking import STEP_METRICS_COLUMNS

    model_dir, run = tmp_path / "tiny", tmp_path / "run"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    row = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]}
    data.write_text(json.dumps(row) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {model_dir}\ndata: {data}\nout: {run}\nmax_steps: 2\nmicro-batch-size: 1\n"
        "lora_r: 2\nschedule: linear\nweight_decay: 0.1\ntarget_modules: [q_proj, v_proj]\n"
    )
    assert modulora("finetune", "--config", config, "--lora-r", 4) == 0
    manifest = json.loads((run / "adapter" / "manifest.json").read_text())
    assert manifest["training"]["schedule"] == "linear" and manifest["training"]["weight_decay"] == 0.1
    assert manifest["training"]["warmup_ratio"] == 0.03  # not in the file: the shared default
    assert manifest["lora"]["r"] == 4 and manifest["lora"]["target_modules"] == ["q_proj", "v_proj"]
    lines = (run / "step_metrics.csv").read_text().splitlines()
    assert lines[0] == ",".join(STEP_METRICS_COLUMNS) and [line.split(",")[0] for line in lines[1:]] == [
        "1",
        "2",
    ]
    assert any((run / "tensorboard").glob("events.out.tfevents.*"))

    config.write_text(f"model: {model_dir}\nlearning_rat: 0.1\n")
    with pytest.raises(SystemExit):
        modulora("finetune", "--config", config)
    assert "unknown option 'learning_rat'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--data, --out required"):
        modulora("finetune", "--model", model_dir)


def test_export_merge_writes_a_folder_transformers_loads_and_gguf_lora_needs_a_gguf_base(
    tmp_path: Path,
) -> None:
    import torch
    from transformers import AutoModelForCausalLM
    from utils.tiny_lm import tiny_llama, tiny_tokenizer

    from modulora.export import export_adapter
    from modulora.lora import LoraConfig, add_lora_

    model_dir = tmp_path / "tiny"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    trained, lora = tiny_llama(), LoraConfig(r=2, alpha=4, dropout=0.0, target_modules=["q_proj"])
    add_lora_(trained, lora)
    torch.nn.init.normal_(trained.model.layers[0].self_attn.q_proj.lora_B["default"].weight, std=0.1)
    export_adapter(
        trained, tmp_path / "run" / "adapter", base_model=str(model_dir), quant_config=None, lora_config=lora
    )

    assert (
        modulora(
            "export", "--model", model_dir, "--adapter", tmp_path / "run", "--merge", "--out", tmp_path / "m"
        )
        == 0
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ids = torch.arange(12)[None]
    with torch.no_grad():
        expected, got = trained.eval()(ids).logits, merged(ids).logits.float()
    assert (got - expected).abs().max() <= 0.03 * expected.abs().max()

    # Without an adapter, --merge writes the base alone, dense.
    assert modulora("export", "--model", model_dir, "--merge", "--out", tmp_path / "base") == 0
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        plain, dense = tiny_llama()(ids).logits, base(ids).logits.float()
    assert (dense - plain).abs().max() <= 0.03 * plain.abs().max()

    with pytest.raises(SystemExit, match="needs a GGUF base"):
        modulora(
            "export",
            "--model",
            model_dir,
            "--adapter",
            tmp_path / "run",
            "--gguf-lora",
            "--out",
            tmp_path / "a.gguf",
        )
