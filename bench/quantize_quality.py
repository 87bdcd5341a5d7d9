"""WikiText-2 perplexity of SmolLM2-135M-Instruct under every quantizer: writes JSON and a markdown table.

    nice -n 10 .venv/bin/python bench/quantize_quality.py            # all rows, resumes from the JSON
    .venv/bin/python bench/quantize_quality.py --device cuda --only optq-4-g64,rtn-4-g64

Protocol (issue 2): `wiki.test.raw` with CRLF read as LF, first 87,684 characters, 22,014 tokens,
42 non-overlapping windows of 512. The fp32 model is loaded once; each row quantizes a copy of it
with `modulora.quantize.quantize_` (layer by layer: the fp model stays on the CPU and one decoder
layer at a time visits `--device`) and evaluates it on `--device`. Finished rows are kept in the
JSON file, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from bench._common import C4_VALIDATION, WIKITEXT2_TEST
from modulora.eval.perplexity import load_wikitext2, perplexity
from modulora.models import load_model
from modulora.quant import QUANTIZERS, QuantConfig
from modulora.quantize import load_calibration, quantize_

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
N_SAMPLES, SEQ_LEN = 128, 512


def rows() -> list[tuple[str, QuantConfig | None]]:
    """(label, config) in the order they run; None marks the unquantized / native-GGUF rows."""

    def optq(bits: int, group: int) -> QuantConfig:
        return QuantConfig(method="optq", bits=bits, group_size=group, n_samples=N_SAMPLES, seq_len=SEQ_LEN)

    def plain(bits: int) -> QuantConfig:
        return QuantConfig(
            method="optq",
            bits=bits,
            group_size=64,
            n_samples=64,
            seq_len=SEQ_LEN,
            true_sequential=False,
            options={"clip_grid": 0},
        )

    def rtn(bits: int, group: int) -> QuantConfig:
        return QuantConfig(method="rtn", bits=bits, group_size=group)

    return [
        ("optq-4-g64", optq(4, 64)), ("optq-3-g64", optq(3, 64)),
        # The plain reference: 64×512 calibration tokens, no clipping search, not true-sequential.
        ("optq-plain-4-g64", plain(4)), ("optq-plain-3-g64", plain(3)),
        ("rtn-4-g64", rtn(4, 64)), ("rtn-3-g64", rtn(3, 64)), ("rtn-2-g64", rtn(2, 64)),
        ("optq-2-g64", optq(2, 64)),
        ("nf4", QuantConfig(method="nf4", bits=4, group_size=64)),
        ("native-q4_1", None), ("fp32", None),
        ("rtn-4-g128", rtn(4, 128)), ("rtn-3-g128", rtn(3, 128)), ("rtn-2-g128", rtn(2, 128)),
        ("optq-4-g128", optq(4, 128)), ("optq-3-g128", optq(3, 128)), ("optq-2-g128", optq(2, 128)),
    ]  # fmt: skip


def write_markdown(results: dict[str, dict], path: Path, command: str) -> None:
    lines = [
        "# Quantization quality: SmolLM2-135M-Instruct, WikiText-2 perplexity",
        "",
        "Written by `bench/quantize_quality.py` (do not edit by hand). Command:",
        "",
        f"    {command}",
        "",
        "WikiText-2 test (`../shared/datasets/wikitext2/wiki.test.raw`, CRLF read as LF), first 87,684",
        "characters = 22,014 tokens, 42 non-overlapping windows of 512 tokens. fp32 = the built-in GGUF",
        "dequantized to fp32; native Q4_1 = the same GGUF's Q4_1 blocks loaded as `GGUFLinear` without",
        "re-quantization (`smollm2-135m-instruct:gguf`). RTN and OPTQ are asymmetric (zero point per",
        "group), GPTQ checkpoint format. OPTQ: act-order, true-sequential, damp 0.01, lazy blocks of 128,",
        "per-group clipping search (grid 20, shrink ≤ 25%, activation-weighted error),",
        f"{N_SAMPLES}×{SEQ_LEN} C4 calibration tokens (`../shared/datasets/c4/c4_validation_2k.jsonl`,",
        "seed 0).",
        "`optq-plain` rows are the issue's plain reference: act-order, 64×512 tokens, no clipping search,",
        "not true-sequential. NF4: QLoRA's codebook, blocks of 64, fp32 absmax. Only the 7 decoder",
        "projections are quantized; embeddings, norms and the head stay fp32.",
        "",
        "| row | method | bits | group | calibration | perplexity | quantize (s) | peak (GiB) | eval (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, _ in rows():
        if label not in results:
            continue
        r = results[label]
        cfg = r["config"] or {}
        calib = f"{cfg['n_samples']}×{cfg['seq_len']}" if cfg.get("method") == "optq" else "-"
        if cfg.get("method") == "optq" and not cfg.get("options", {}).get("clip_grid", 20):
            calib += ", plain"
        peak = "-" if r.get("quantize_peak_gib") is None else f"{r['quantize_peak_gib']:.2f}"
        lines.append(
            f"| {label} | {r['method']} | {r['bits']} | {r['group']} | {calib} | {r['perplexity']:.2f} "
            f"| {r['quantize_s']:.1f} | {peak} | {r['eval_s']:.1f} |"
        )
    extra = [label for label in results if label not in dict(rows())]
    if extra:  # the same row on another platform, merged in from its own --json file
        lines += [
            "",
            "Cross-checks (same code, another platform: float rounding differs, not the method):",
            "",
        ]
        for label in extra:
            r = results[label]
            lines.append(f"- {label}: perplexity {r['perplexity']:.3f} ({r['device']}, torch {r['torch']})")
    missing = [label for label, _ in rows() if label not in results]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)}."]
    devices = sorted(
        {f"{r['device']} ({r.get('gpu') or 'cpu'}, torch {r.get('torch')})" for r in results.values()}
    )
    lines += [
        "",
        f"Ran on: {', '.join(devices)}; float32 throughout (TF32 off). `peak` = peak accelerator memory",
        "while quantizing: the fp model stays on the CPU and one decoder layer at a time visits the",
        "accelerator (the calibration activations, 128×512×576 floats in and out, dominate it).",
    ]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated row labels")
    parser.add_argument("--device", default="cpu", help="where layers are quantized and models evaluated")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "quantize_quality.json")
    parser.add_argument("--markdown", type=Path, default=REPO / "bench" / "results" / "quantize_quality.md")
    args = parser.parse_args()
    command = f"python bench/quantize_quality.py --device {args.device}" + (
        f" --only {args.only}" if args.only else ""
    )
    device = torch.device(args.device)
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    wanted = set(args.only.split(",")) if args.only else {label for label, _ in rows()}
    todo = [(label, cfg) for label, cfg in rows() if label not in results and label in wanted]
    if not todo:  # only rewrite the table, with the device the rows ran on
        ran_on = ",".join(sorted({results[label]["device"] for label, _ in rows() if label in results}))
        command = command.replace(f"--device {args.device}", f"--device {ran_on}")
        write_markdown(results, args.markdown, command)
        return
    model, tokenizer = load_model(MODEL)
    text = load_wikitext2(WIKITEXT2_TEST)
    calibrations: dict[int, torch.Tensor] = {}
    for label, config in todo:
        if config is not None and config.method not in QUANTIZERS:
            print(f"{label}: quantizer {config.method!r} not available, skipped", flush=True)
            continue
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        if label == "fp32":
            candidate, method, bits, group = model, "none (fp32)", 32, "-"
        elif label == "native-q4_1":
            candidate, _ = load_model(f"{MODEL}:gguf")
            method, bits, group = "gguf Q4_1 (native)", 4, 32
        else:
            if config.method == "optq" and config.n_samples not in calibrations:
                calibrations[config.n_samples] = load_calibration(
                    tokenizer, C4_VALIDATION, config.n_samples, SEQ_LEN, seed=0
                )
            candidate = quantize_(
                copy.deepcopy(model),
                config,
                calibrations.get(config.n_samples) if config.method == "optq" else None,
                device=device,
                progress=lambda done, total, row=label: print(f"  {row}: layer {done}/{total}", flush=True),
            )
            method, bits, group = config.method, config.bits, config.group_size
        quantize_s = time.perf_counter() - start
        peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        start = time.perf_counter()
        ppl = perplexity(candidate.to(device), tokenizer, text, window=512)
        candidate.to("cpu")
        eval_s = time.perf_counter() - start
        results[label] = {
            "method": method, "bits": bits, "group": group, "perplexity": ppl,
            "quantize_s": quantize_s, "eval_s": eval_s, "quantize_peak_gib": peak_gib, "device": str(device),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "torch": torch.__version__,
            "config": config.to_dict() if config is not None else None,
        }  # fmt: skip
        print(f"{label}: perplexity {ppl:.3f} (quantize {quantize_s:.0f} s, eval {eval_s:.0f} s)", flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        write_markdown(results, args.markdown, command)
        del candidate


if __name__ == "__main__":
    main()
