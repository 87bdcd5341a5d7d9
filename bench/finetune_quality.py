"""Finetuning quality on the real model: LoRA on the unquantized base vs ModuLoRA on quantized bases.

SmolLM2-135M-Instruct, two classification tasks, one short prompt per example and one-token label
words, accuracy by scoring the label words (`modulora.eval.tasks.accuracy`):
- TREC (coarse, 6 classes): train.jsonl (5,452) -> test.jsonl (500).
- AG News (4 classes): test.jsonl split 6,000 train / 1,600 test with random.Random(0).

Every row uses the same seed, adapter init, data order, steps and hyperparameters; only the base
differs. Results are appended to a JSON-lines file as each row finishes; `--report` prints the table.

    python bench/finetune_quality.py --tasks trec agnews --rows zero-shot lora-fp32 optq-4 optq-3 nf4-4
    python bench/finetune_quality.py --report
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
RESULTS = REPO / "bench" / "results" / "finetune_quality.jsonl"
MODEL = "smollm2-135m-instruct"

TASKS = {
    "trec": {
        "template": "Question: {text}\nType:",
        "labels": [" description", " entity", " abbreviation", " human", " location", " number"],
    },
    "agnews": {
        "template": "Article: {text}\nTopic:",
        "labels": [" World", " Sports", " Business", " Technology"],  # classes 1..4 of classes.txt
    },
}
ROWS = {
    "zero-shot": None,
    "lora-fp32": None,
    "optq-4": {"method": "optq", "bits": 4, "group_size": 64, "n_samples": 64},
    "optq-3": {"method": "optq", "bits": 3, "group_size": 64, "n_samples": 64},
    "nf4-4": {"method": "nf4", "bits": 4, "group_size": 64},
    "rtn-4": {"method": "rtn", "bits": 4, "group_size": 64},
    # QuIP#: E8P codebook on Hadamard-rotated weights (no groups), signs tuned after BlockLDLQ.
    "quip#-2": {"method": "quip#", "bits": 2, "n_samples": 64, "options": {"tune_signs": True}},
}


def load_task(
    name: str, max_words: int, datasets: Path = DATASETS
) -> tuple[list[dict], list[str], list[int]]:
    """(train rows as prompt/completion, test prompts, test labels)."""
    spec = TASKS[name]

    def read(path: Path) -> list[tuple[str, int]]:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        offset = 1 if name == "agnews" else 0  # AG News labels are 1-indexed
        return [(" ".join(r["sentence"].split()[:max_words]), int(r["label"]) - offset) for r in rows]

    if name == "trec":
        train, test = read(datasets / "trec" / "train.jsonl"), read(datasets / "trec" / "test.jsonl")
    else:
        rows = read(datasets / "ag_news" / "test.jsonl")
        order = list(range(len(rows)))
        random.Random(0).shuffle(order)
        train, test = [rows[i] for i in order[:6000]], [rows[i] for i in order[6000:]]
    prompt = spec["template"].format
    train_rows = [{"prompt": prompt(text=t), "completion": spec["labels"][y]} for t, y in train]
    return train_rows, [prompt(text=t) for t, _ in test], [y for _, y in test]


def base_model(row: str, cache: Path, device: str, calibration_samples: int, datasets: Path = DATASETS):
    """The base for a row: the fp32 model, or a quantized base (quantized once, cached in `cache`)."""
    from modulora.models import load_model
    from modulora.quant import QuantConfig
    from modulora.quantize import quantize_model

    spec = ROWS[row]
    if spec is None:
        return load_model(MODEL, device=device)
    if "n_samples" in spec:
        spec = spec | {
            "n_samples": calibration_samples,
            "calibration": str(datasets / "c4" / "c4_validation_2k.jsonl"),
        }
    folder = cache / f"{MODEL}-{row}-g{spec.get('group_size', 0)}-n{spec.get('n_samples', 0)}"
    if not folder.is_dir():
        started = time.perf_counter()
        quantize_model(MODEL, QuantConfig(**spec), folder)
        print(f"  quantized {row} in {time.perf_counter() - started:.0f} s", flush=True)
    return load_model(folder, device=device)


def run_row(task: str, row: str, args: argparse.Namespace) -> dict:
    import torch

    from modulora.data import build_examples
    from modulora.eval.tasks import accuracy
    from modulora.lora import LoraConfig, add_lora_
    from modulora.train import TrainConfig, finetune

    train_rows, prompts, labels = load_task(task, args.max_words, args.datasets)
    if args.eval_limit:
        prompts, labels = prompts[: args.eval_limit], labels[: args.eval_limit]
    model, tokenizer = base_model(row, args.cache, args.device, args.calibration_samples, args.datasets)
    result = {"task": task, "row": row, "steps": 0, "train_s": 0.0, "final_loss": None}
    if row != "zero-shot":
        torch.manual_seed(args.seed)  # the same adapter init for every row
        lora = LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=0.05, target_modules="all-linear")
        add_lora_(model, lora)
        config = TrainConfig(
            learning_rate=args.lr,
            max_steps=args.steps,
            micro_batch_size=args.micro_batch,
            warmup_steps=args.steps // 10,
            schedule="cosine",
            seed=args.seed,
            max_seq_len=128,
        )
        examples = build_examples(train_rows, "prompt_completion", tokenizer, config.max_seq_len)
        losses: list[float] = []

        def log(m) -> None:
            losses.append(m.loss)
            if m.step % 25 == 0 or m.step == m.total_steps:
                recent = sum(losses[-25:]) / len(losses[-25:])
                where = f"{task} {row} step {m.step}/{m.total_steps}"
                print(f"  {where} loss {recent:.3f} ({m.step_time_s:.2f} s/step)", flush=True)

        started = time.perf_counter()
        trained = finetune(model, tokenizer, examples, config, callback=log)
        result |= {
            "steps": trained.step,
            "train_s": time.perf_counter() - started,
            "final_loss": sum(trained.losses[-25:]) / len(trained.losses[-25:]),
        }
    started = time.perf_counter()
    result["accuracy"] = accuracy(model, tokenizer, prompts, TASKS[task]["labels"], labels, batch_size=32)
    result |= {
        "eval_s": time.perf_counter() - started,
        "test_examples": len(prompts),
        "hyperparameters": {
            k: v
            for k, v in vars(args).items()
            if k not in ("tasks", "rows", "cache", "out", "datasets", "report")
        },
    }
    return result


def report(path: Path) -> str:
    """The markdown table: accuracy per (row, task), latest result of each, plus the gap to LoRA fp32."""
    results = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        results[(r["row"], r["task"])] = r
    tasks = [t for t in TASKS if any(k[1] == t for k in results)]
    lines = [
        "| base | " + " | ".join(f"{t} acc. (Δ vs LoRA fp32)" for t in tasks) + " | train time / row |",
        "|---|" + "---|" * len(tasks) + "---|",
    ]
    for row in ROWS:
        if not any((row, t) in results for t in tasks):
            continue
        cells = []
        for t in tasks:
            r, ref = results.get((row, t)), results.get(("lora-fp32", t))
            if r is None:
                cells.append("–")
                continue
            delta = f" ({100 * (r['accuracy'] - ref['accuracy']):+.1f})" if ref and row != "lora-fp32" else ""
            cells.append(f"{100 * r['accuracy']:.1f}{delta}")
        times = ", ".join(
            f"{results[(row, t)]['train_s'] / 60:.0f} min" for t in tasks if (row, t) in results
        )
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {times} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument(
        "--rows",
        nargs="+",
        default=["zero-shot", "lora-fp32", "optq-4", "optq-3", "nf4-4"],
        choices=list(ROWS),
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-words", type=int, default=40, help="article/question words kept (cost)")
    parser.add_argument(
        "--eval-limit", type=int, default=0, help="score only the first N test prompts (0: all)"
    )
    parser.add_argument("--calibration-samples", type=int, default=64, help="OPTQ: C4 windows of 512 tokens")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--datasets", type=Path, default=DATASETS, help="folder holding trec/, ag_news/, c4/")
    parser.add_argument(
        "--cache", type=Path, default=None, help="quantized bases (default: MODULORA_HOME/bases)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--report", action="store_true", help="print the table of --out and exit")
    args = parser.parse_args()
    if args.report:
        print(report(args.out))
        return
    import torch

    from modulora.settings import get_settings

    if args.threads:
        torch.set_num_threads(args.threads)
    args.cache = args.cache or get_settings().bases_dir
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for task in args.tasks:
        for row in args.rows:
            print(f"{task} / {row}", flush=True)
            result = run_row(task, row, args)
            took = f"train {result['train_s']:.0f} s, eval {result['eval_s']:.0f} s"
            print(f"  accuracy {100 * result['accuracy']:.1f} ({took})", flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(result, default=str) + "\n")


if __name__ == "__main__":
    main()
