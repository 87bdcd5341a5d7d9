"""The `modulora` command: quantize, finetune, export, generate, eval and demo (library subcommands).

    modulora quantize --model smollm2-135m-instruct --method optq --bits 4 --group-size 64 --out base4
    modulora finetune --model base4 --data train.jsonl --max-steps 200 --out run
    modulora finetune --config run.yaml          # the same options from a file
    modulora export --model base4 --adapter run --merge --out merged
    modulora generate --model base4 --adapter run --prompt "Hello"
    modulora eval --model base4 --adapter run --task perplexity --data wiki.test.raw

Extending it: every subcommand is a function `register(subparsers)` that adds its parser and sets
`func(args) -> int | None`. The library's own are listed in `SUBCOMMANDS`; other packages add theirs
through the entry-point group `modulora.cli` (the service registers `serve`, `worker`, `keys`), so
the library never imports them. Heavy imports (torch, transformers) happen inside the handlers.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ENTRY_POINT_GROUP = "modulora.cli"
EVAL_TASKS = ("perplexity", "accuracy", "exact-match", "rouge")


class _QuantizerNames:
    """`choices` for --method that reads `modulora.quant.QUANTIZERS` only when argparse checks or lists
    them, so `modulora --help` and the service's subcommands do not import torch."""

    def _names(self) -> list[str]:
        from modulora.quant import QUANTIZERS

        return sorted(QUANTIZERS)

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _progress(total: int | None, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)


def _add_model_args(parser: argparse.ArgumentParser, adapter: bool = True) -> None:
    parser.add_argument(
        "--model", required=True, help="built-in name, Hugging Face folder, GGUF or quantized folder"
    )
    if adapter:
        parser.add_argument("--adapter", type=Path, help="adapter folder (from `modulora finetune --out`)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    """(model, tokenizer) for --model, with --adapter loaded unfused on top."""
    from modulora.export import load_adapter
    from modulora.models import load_model

    model, tokenizer = load_model(args.model, device=_device(args.device))
    if getattr(args, "adapter", None):
        load_adapter(model, adapter_folder(args.adapter)).eval()
    return model, tokenizer


def adapter_folder(path: Path) -> Path:
    """An adapter folder, or a finetune output folder holding one in `adapter/`."""
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise SystemExit(f"--adapter: no adapter_config.json in {path} or {path / 'adapter'}")


# ---------------------------------------------------------------------------------------------- quantize


def register_quantize(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quantize", help="quantize a model layer by layer and save it (GPTQ layout)")
    _add_model_args(p, adapter=False)
    p.add_argument("--method", required=True, choices=_QuantizerNames(), help="quantizer")
    p.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    p.add_argument("--group-size", type=int, default=128, help="input channels per scale; -1: per channel")
    p.add_argument("--sym", action="store_true", help="symmetric codes")
    p.add_argument(
        "--no-act-order", dest="act_order", action="store_false", help="OPTQ: natural column order"
    )
    p.add_argument(
        "--calibration",
        help="calibration file: .txt, or .jsonl/.json/.csv rows with `text` or in a training format "
        "(chat, alpaca, prompt/completion); default: the C4 sample shipped in the package",
    )
    p.add_argument("--n-samples", type=int, help="calibration windows (default: 128 on a GPU, 16 on a CPU)")
    p.add_argument(
        "--seq-len", type=int, help="tokens per calibration window (default: 512 on a GPU, 256 on a CPU)"
    )
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    from modulora.quant import QuantConfig
    from modulora.quantize import quantize_model

    config = QuantConfig(
        method=args.method,
        bits=args.bits,
        group_size=args.group_size,
        sym=args.sym,
        act_order=args.act_order,
        calibration=args.calibration,
        n_samples=args.n_samples,
        seq_len=args.seq_len,
    )
    with _progress(None, f"quantize {args.method} {args.bits}-bit") as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        out = quantize_model(args.model, config, args.out, progress)
    print(f"quantized model: {out}")
    return 0


# ---------------------------------------------------------------------------------------------- finetune


class _ConfigFile(argparse.Action):
    """`--config run.yaml`: the file's keys are the command's options (`learning_rate` or
    `learning-rate`) and become their values; options given after `--config` override it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:  # fmt: skip
        import yaml

        try:
            config = yaml.safe_load(Path(values).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            parser.error(f"--config: cannot read {values}: {e}")
        if not isinstance(config, dict):
            parser.error(f"--config: {values} must hold a mapping of option names to values")
        actions = {a.dest: a for a in parser._actions if a.dest not in ("help", self.dest)}
        for key, value in config.items():
            dest = str(key).replace("-", "_")
            action = actions.get(dest) or next((a for a in actions.values() if key in a.option_strings), None)
            if action is None:
                parser.error(f"--config: unknown option {key!r} in {values}")
            if action.type is not None and value is not None:
                value = [action.type(v) for v in value] if isinstance(value, list) else action.type(value)
            setattr(namespace, action.dest, value)


def register_finetune(subparsers: argparse._SubParsersAction) -> None:
    from modulora import training_defaults as defaults

    p = subparsers.add_parser("finetune", help="train a LoRA adapter on a (quantized) model")
    p.add_argument(
        "--config", action=_ConfigFile, metavar="RUN_YAML",
        help="YAML of options (model, data, lora_r, schedule, ...); put it first: later options override it",
    )  # fmt: skip
    p.add_argument("--model", help="built-in name, Hugging Face folder, GGUF or quantized folder (required)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--data", type=Path, help=".jsonl/.json/.csv training rows (required)")
    p.add_argument("--validation", type=Path, help="validation rows (same formats)")
    p.add_argument(
        "--format", default="auto", help="auto, messages, sharegpt, alpaca, prompt_completion, text"
    )
    p.add_argument("--lora-r", type=int, default=defaults.LORA_R)
    p.add_argument("--lora-alpha", type=float, default=defaults.LORA_ALPHA)
    p.add_argument("--lora-dropout", type=float, default=defaults.LORA_DROPOUT)
    p.add_argument(
        "--target-modules", nargs="+", default=["all-linear"], help="all-linear or names (q_proj ...)"
    )
    p.add_argument("--max-steps", type=int)
    p.add_argument("--epochs", type=int, default=defaults.N_EPOCHS)
    p.add_argument("--learning-rate", "--lr", type=float, default=defaults.LEARNING_RATE)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--gradient-accumulation", type=int, default=1)
    p.add_argument("--max-seq-len", type=int, default=defaults.MAX_SEQ_LEN)
    p.add_argument("--warmup-ratio", type=float, default=defaults.WARMUP_RATIO)
    p.add_argument("--schedule", default=defaults.SCHEDULE, choices=defaults.SCHEDULES)
    p.add_argument("--weight-decay", type=float, default=defaults.WEIGHT_DECAY)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="autocast dtype")
    p.add_argument("--packing", action="store_true")
    p.add_argument("--train-on-prompt", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument(
        "--no-cuda-graphs", dest="cuda_graphs", action="store_false",
        help="on a GPU, run every step eagerly instead of replaying CUDA graphs",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--out", type=Path, help="checkpoints/ and adapter/ are written here (required)")
    p.set_defaults(func=run_finetune)


def run_finetune(args: argparse.Namespace) -> int:
    import torch

    from modulora.data import build_examples, dataset_sha256, read_rows
    from modulora.export import export_adapter
    from modulora.lora import LoraConfig, add_lora_
    from modulora.models import load_model, transformers_folder
    from modulora.tracking import STEP_METRICS_FILE, RunLog, step_metrics_csv
    from modulora.train import TrainConfig, finetune, latest_checkpoint

    if missing := [name for name in ("model", "data", "out") if getattr(args, name) is None]:
        raise SystemExit(
            f"finetune: {', '.join('--' + m for m in missing)} required (as options or in --config)"
        )
    targets = args.target_modules[0] if args.target_modules == ["all-linear"] else args.target_modules
    lora = LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, target_modules=targets)
    config = TrainConfig(
        learning_rate=args.learning_rate,
        epochs=args.epochs,
        max_steps=args.max_steps,
        micro_batch_size=args.micro_batch_size,
        gradient_accumulation=args.gradient_accumulation,
        warmup_ratio=args.warmup_ratio,
        schedule=args.schedule,
        weight_decay=args.weight_decay,
        seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
        cuda_graphs=args.cuda_graphs,
        max_seq_len=args.max_seq_len,
        packing=args.packing,
        train_on_prompt=args.train_on_prompt,
        eval_every=args.eval_every,
        save_every=args.save_every,
        output_dir=str(args.out),
        dtype=args.dtype,
    )
    model, tokenizer = load_model(args.model, device=_device(args.device))

    def examples(path: Path) -> list[dict[str, list[int]]]:
        return build_examples(
            read_rows(path),
            args.format,
            tokenizer,
            config.max_seq_len,
            config.train_on_prompt,
            config.packing,
        )

    train, val = examples(args.data), examples(args.validation) if args.validation else None
    torch.manual_seed(args.seed)
    add_lora_(model, lora)
    resume = latest_checkpoint(args.out) if args.resume else None
    step_rows: list[dict[str, Any]] = []
    with (
        _progress(None, "finetune") as bar,
        RunLog(args.out / "tensorboard", config=vars_for_log(args)) as log,
    ):

        def report(m: Any) -> None:
            row = {
                "step": m.step,
                "train_loss": m.loss,
                "valid_loss": m.val_loss,
                "learning_rate": m.learning_rate,
            }
            log.log(m.step, row)
            step_rows.append(row)
            bar.total = m.total_steps
            bar.update(m.step - bar.n)
            bar.set_postfix(
                loss=f"{m.loss:.4f}",
                lr=f"{m.learning_rate:.2e}",
                **({"val_loss": f"{m.val_loss:.4f}"} if m.val_loss is not None else {}),
            )

        result = finetune(
            model, tokenizer, train, config, val_examples=val, callback=report, resume_from=resume
        )
    metrics = {
        "train_loss": result.losses[-1] if result.losses else None,
        "val_loss": result.val_losses[max(result.val_losses)] if result.val_losses else None,
    }
    (args.out / STEP_METRICS_FILE).write_text(step_metrics_csv(step_rows))
    out = export_adapter(
        model,
        args.out / "adapter",
        base_model=str(args.model),
        base_model_name_or_path=str(transformers_folder(args.model)),
        quant_config=_quant_config(args.model),
        lora_config=lora,
        train_config=config,
        dataset_sha256=dataset_sha256(args.data),
        tokenizer=tokenizer,
        metrics=metrics,
    )
    print(
        f"{result.status} after {result.step} steps; train loss {metrics['train_loss']:.4f}; adapter: {out}; "
        f"metrics: {args.out / STEP_METRICS_FILE}, TensorBoard: {args.out / 'tensorboard'}"
    )
    return 0


def vars_for_log(args: argparse.Namespace) -> dict[str, Any]:
    """The run's options as plain values, for the run log's config."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"}


def _quant_config(ref: str) -> dict[str, Any] | None:
    """The quantization config recorded in a quantized folder, else None."""
    path = Path(ref) / "quantize_config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    return config.get("modulora", {}).get("quant_config", config)


# ---------------------------------------------------------------------------------------------- export


def register_export(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="write an adapter for other stacks: merged dense weights, or llama.cpp's LoRA GGUF"
    )
    _add_model_args(p, adapter=False)
    p.add_argument(
        "--adapter", type=Path,
        help="adapter folder (from `modulora finetune --out`); --merge without one dequantizes the base",
    )  # fmt: skip
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument(
        "--merge", action="store_const", dest="export_format", const="merged",
        help="dense bf16 Hugging Face folder: base dequantized, adapter merged (transformers, vLLM, ...)",
    )  # fmt: skip
    kind.add_argument(
        "--gguf-lora", action="store_const", dest="export_format", const="gguf-lora",
        help="llama.cpp LoRA GGUF for a GGUF base (llama-cli -m base.gguf --lora adapter.gguf)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="folder (--merge) or .gguf file (--gguf-lora)")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from modulora.export import export_for_other_stacks

    try:
        adapter = adapter_folder(args.adapter) if args.adapter else None
        out = export_for_other_stacks(args.model, adapter, args.export_format, args.out)
    except ValueError as e:
        raise SystemExit(f"export: {e}") from None
    print(f"{args.export_format}: {out}")
    return 0


# ---------------------------------------------------------------------------------------------- generate


def register_generate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="complete prompts with a model (and adapter) on the inference engine"
    )
    _add_model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--chat", action="store_true", help="send each prompt as a user message (chat template)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--stop", action="append", default=[], help="up to 4")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--no-stream", dest="stream", action="store_false", help="print when done, not token by token"
    )
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    """Serve --model (and --adapter) on the engine the HTTP API runs, so both answer alike."""
    from modulora.serve.engine import InferenceEngine
    from modulora.serve.types import EngineConfig, EngineError, ModelSpec, SamplingParams

    adapter = adapter_folder(args.adapter) if args.adapter else None
    spec = ModelSpec(id=str(adapter or args.model), base=args.model, adapter_dir=adapter)
    try:
        params = SamplingParams(
            max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, stop=args.stop, seed=args.seed,
        )  # fmt: skip
    except ValueError as error:
        raise SystemExit(f"generate: {error}") from None
    prompts = [[{"role": "user", "content": p}] if args.chat else p for p in args.prompt]
    rows = min(len(prompts), 16)  # KV cache rows: up to 16 prompts decode together, the rest wait
    engine = InferenceEngine(EngineConfig(device=args.device or "auto", max_batch_size=rows))
    try:
        requests = [engine.stream(spec, params, prompt) for prompt in prompts]
        for events in requests:
            _print_completion(events, live=args.stream and len(prompts) == 1)
    except EngineError as error:
        raise SystemExit(f"generate: {error.message}") from None
    finally:
        engine.shutdown()
    return 0


def _print_completion(events: Iterator[Any], live: bool) -> None:
    """Print one request's text on a line of its own, as it arrives when `live`; raises its error."""
    from modulora.serve.events import ErrorEvent, TextEvent

    pieces = []
    for event in events:
        if isinstance(event, ErrorEvent):
            raise event.error
        if isinstance(event, TextEvent):
            if live:
                print(event.text, end="", flush=True)
            else:
                pieces.append(event.text)
    print("".join(pieces))


# ---------------------------------------------------------------------------------------------- eval


def register_eval(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model (and adapter) on a task")
    _add_model_args(p)
    p.add_argument("--task", required=True, choices=EVAL_TASKS)
    p.add_argument(
        "--data",
        type=Path,
        help=(
            "required; perplexity: a text file (.raw/.txt) or rows with `text`; "
            "accuracy: rows with prompt, choices, label; exact-match/rouge: prompt/completion, alpaca "
            "or chat rows (the last assistant turn is the reference)"
        ),
    )
    p.add_argument("--limit", type=int, help="use only the first N rows")
    p.add_argument("--window", type=int, default=512, help="perplexity window (tokens)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="exact-match/rouge generation budget")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=run_eval)


# What each task reads, for the error when --data is missing (no evaluation data ships with the library).
EVAL_DATA = {
    "perplexity": "a text file (.raw/.txt), e.g. WikiText-2's wiki.test.raw, or rows with a `text` field",
    "accuracy": ".jsonl/.json/.csv rows with prompt, choices and label",
    "exact-match": "prompt/completion, alpaca or chat rows (the last assistant turn is the reference)",
    "rouge": "prompt/completion, alpaca or chat rows (the last assistant turn is the reference)",
}


def run_eval(args: argparse.Namespace) -> int:
    from modulora.data import DataError, read_rows
    from modulora.eval import rows

    if args.data is None:
        raise SystemExit(f"--data: --task {args.task} needs {EVAL_DATA[args.task]}; pass --data PATH")
    model, tokenizer = _load(args)
    try:
        if args.task == "perplexity":
            from modulora.eval.perplexity import perplexity

            text = rows.perplexity_text(args.data, args.limit)
            value = perplexity(model, tokenizer, text, window=args.window, batch_size=args.batch_size)
            print(f"perplexity: {value:.4f}")
            return 0
        data = read_rows(args.data)[: args.limit]
        if args.task == "accuracy":
            from modulora.eval.tasks import row_accuracy

            print(f"accuracy: {row_accuracy(model, tokenizer, data, args.batch_size):.4f}")
            return 0
        prompts, references = zip(*(rows.prompt_and_reference(row) for row in data), strict=True)
    except DataError as error:
        raise SystemExit(f"--data {error}") from None
    from modulora.eval.tasks import exact_match, rouge
    from modulora.generate import generate
    from modulora.serve.types import SamplingParams

    greedy = SamplingParams(max_tokens=args.max_new_tokens, temperature=0)
    predictions = []
    for start in range(0, len(prompts), args.batch_size):
        batch = list(prompts[start : start + args.batch_size])
        predictions += [c.text for c in generate(model, tokenizer, batch, greedy)]
    if args.task == "exact-match":
        print(f"exact_match: {exact_match(predictions, references):.4f}")
    else:
        print(" ".join(f"{k}: {v:.4f}" for k, v in rouge(predictions, references).items()))
    return 0


# ---------------------------------------------------------------------------------------------- demo

DEMO_ROWS = [
    {"prompt": f"Question: {q}\nType:", "completion": f" {t}"}
    for q, t in [
        ("Who wrote Hamlet?", "human"), ("Where is the Eiffel Tower?", "location"),
        ("How many legs does a spider have?", "number"), ("What does NASA stand for?", "abbreviation"),
        ("Who painted the Mona Lisa?", "human"), ("What is the capital of Japan?", "location"),
        ("How old is the universe?", "number"), ("What does DNA stand for?", "abbreviation"),
        ("Who discovered penicillin?", "human"), ("Where is Mount Everest?", "location"),
        ("How tall is the Empire State Building?", "number"), ("What does CPU stand for?", "abbreviation"),
    ]
]  # fmt: skip


def register_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="quantize SmolLM2 to 4 bits, finetune a few steps, generate")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", type=Path, help="default: MODULORA_HOME/demo")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from modulora.settings import get_settings

    out = args.out or get_settings().home / "demo"
    out.mkdir(parents=True, exist_ok=True)
    data = out / "demo.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in DEMO_ROWS))
    base = out / "base-rtn4"
    steps: list[list[str]] = []
    if not (base / "quantize_config.json").is_file():
        steps.append(
            [
                "quantize",
                "--model",
                args.model,
                "--method",
                "rtn",
                "--bits",
                "4",
                "--group-size",
                "64",
                "--out",
                str(base),
            ]
        )
    steps.append(
        [
            "finetune",
            "--model",
            str(base),
            "--data",
            str(data),
            "--max-steps",
            str(args.steps),
            "--micro-batch-size",
            "4",
            "--learning-rate",
            "1e-3",
            "--lora-r",
            "8",
            "--max-seq-len",
            "64",
            "--out",
            str(out / "run"),
        ]
    )
    steps.append(
        [
            "generate",
            "--model",
            str(base),
            "--adapter",
            str(out / "run"),
            "--max-new-tokens",
            "4",
            "--prompt",
            "Question: Who invented the telephone?\nType:",
        ]
    )
    device = ["--device", args.device] if args.device else []
    for argv in steps:
        print(f"$ modulora {' '.join(argv)}", flush=True)
        if code := main(argv + device):
            return code
    return 0


# ---------------------------------------------------------------------------------------------- main

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    register_quantize,
    register_finetune,
    register_export,
    register_generate,
    register_eval,
    register_demo,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modulora", description="Finetune LLMs in 2, 3 and 4 bits (ModuLoRA)."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(subparsers)
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        entry_point.load()(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
