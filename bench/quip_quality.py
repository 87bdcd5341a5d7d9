"""QuIP# 2-bit quality: SmolLM2-135M-Instruct WikiText-2 perplexity against OPTQ and RTN at 2 bits.

    MODULORA_HOME=.cache/test-home python bench/quip_quality.py \
        [--rows quip#,quip#-untuned,optq,rtn] [--n-samples 128] [--threads 1] [--out $OUT/quip_quality.json]

CPU only (the real model stays on this machine). Windows as in the core issue: the first 87,684
characters of WikiText-2 test (CRLF read as LF), 42 non-overlapping windows of 512 tokens.
Calibration: `n_samples` random 512-token windows of the C4 validation sample, the same for every
row. Each row quantizes a fresh fp32 copy layer by layer (each layer calibrated on the outputs of
the already-quantized ones; within a layer all seven Hessians come from one pass unless
--true-sequential) and prints as it ends.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import C4_VALIDATION, WIKITEXT2_TEST, environment, print_table, write_json  # noqa: E402
from modulora.eval.perplexity import load_wikitext2, perplexity  # noqa: E402
from modulora.models import load_model  # noqa: E402
from modulora.quant import QuantConfig, QuantizedLinear  # noqa: E402
from modulora.quantize import load_calibration, quantize_  # noqa: E402

MODEL = "smollm2-135m-instruct"
ROWS: dict[str, QuantConfig | None] = {
    "fp32": None,
    "quip#": QuantConfig(method="quip#", bits=2, options={"tune_signs": True}),
    "quip#-untuned": QuantConfig(method="quip#", bits=2, options={"tune_signs": False}),
    "optq": QuantConfig(method="optq", bits=2, group_size=64),
    "rtn": QuantConfig(method="rtn", bits=2, group_size=64),
}


def bits_per_weight(model: torch.nn.Module) -> float:
    """Stored bits per weight of the quantized linears (codes, scales, sign vectors; not the bias)."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    return 8 * sum(m.weight_bytes for m in layers) / sum(m.in_features * m.out_features for m in layers)


def report_progress(name: str, start: float) -> Callable[[int, int], None]:
    def report(done: int, total: int) -> None:
        print(f"  {name}: layer {done}/{total} at {time.perf_counter() - start:.0f} s", flush=True)

    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="quip#,quip#-untuned,optq,rtn", help=f"comma list of {list(ROWS)}")
    parser.add_argument("--n-samples", type=int, default=128, help="calibration windows of 512 tokens")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--true-sequential", action="store_true", help="re-run each layer between q/k/v, o, ..."
    )
    parser.add_argument("--out", default=None, help="JSON file or folder (default: $OUT or .)")
    args = parser.parse_args()
    names = args.rows.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"--rows: {unknown} not in {list(ROWS)}")
    torch.set_num_threads(args.threads)

    base, tokenizer = load_model(MODEL, device="cpu", dtype=torch.float32)
    text = load_wikitext2(WIKITEXT2_TEST)
    ids = load_calibration(tokenizer, C4_VALIDATION, args.n_samples, 512, seed=0)
    results = []
    for name in names:
        config = ROWS[name]
        start = time.perf_counter()
        model = copy.deepcopy(base)
        row = {"row": name, "method": "fp32" if config is None else config.method}
        if config is not None:
            config = dataclasses.replace(
                config, n_samples=args.n_samples, true_sequential=args.true_sequential
            )
            torch.manual_seed(config.seed)
            quantize_(model, config, ids, progress=report_progress(name, start), device="cpu")
            row.update(config=config.to_dict(), bits_per_weight=round(bits_per_weight(model), 3))
        row["quantize_s"] = round(time.perf_counter() - start, 1)
        row["wikitext2_ppl"] = round(perplexity(model, tokenizer, text, window=512), 2)
        row["total_s"] = round(time.perf_counter() - start, 1)
        results.append(row)
        print(f"{name}: ppl {row['wikitext2_ppl']} in {row['total_s']} s", flush=True)
        del model

    print_table(results, ["row", "bits_per_weight", "wikitext2_ppl", "quantize_s", "total_s"])
    payload = {
        "model": MODEL,
        "eval": "WikiText-2 test, first 87,684 chars, 42 x 512-token windows",
        "calibration": f"C4 validation sample, {args.n_samples} x 512 tokens, seed 0",
        "threads": args.threads,
        "environment": environment(),
        "rows": results,
    }
    print("wrote", write_json("quip_quality.json", payload, args.out))


if __name__ == "__main__":
    main()
