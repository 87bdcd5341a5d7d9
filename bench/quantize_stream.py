"""Streaming quantization of LLaMA-shaped checkpoints: time, peak host RSS and peak GPU memory.

For each shape, a random bf16 checkpoint is written to a temporary folder
(`bench.synthetic_checkpoint`), then two fresh processes run on it, each reporting its own peak
RSS (`getrusage`'s high-water mark, so nothing between samples is missed):
- quantize: the default job's quantization (OPTQ 4-bit, group 128, the shipped C4 calibration
  sized to the device), `modulora.quantize.quantize_model`;
- load: the quantized base loaded onto the device as a training worker loads it (`load_model`).
Peak host RSS should be flat in the model size: one decoder layer plus the embeddings pass through
host memory, never the model.

    python -m bench.quantize_stream --shapes 7b 13b --out quantize_stream.json   # on a GPU
    python -m bench.quantize_stream --shapes tiny                                 # CPU smoke test

Targets (issue 22, on the H200): 7B peak RSS ≤ 6 GiB, 13B ≤ 7B + 0.5 GiB, 7B in ≤ 5 minutes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import environment, print_table, write_json
from bench.synthetic_checkpoint import SHAPES, smollm2_tokenizer_dir, write_synthetic_llama

GIB = 2**30
RSS_7B_LIMIT = 6 * GIB
RSS_GROWTH_LIMIT = GIB // 2  # 13B over 7B
TIME_7B_LIMIT_S = 300.0
COLUMNS = [
    "shape", "device", "write_s", "quantize_s", "quantize_rss_gib", "quantize_gpu_gib", "load_s",
    "load_rss_gib", "load_gpu_gib", "checkpoint_gib", "quantized_gib",
]  # fmt: skip


def _measure(phase: str, source: str, out: str) -> dict:
    """Run one phase in this process and return its time and peak memory (called in a child)."""
    import resource

    import torch

    from modulora.quant import QuantConfig
    from modulora.quantize import default_device, quantize_model

    device = default_device()
    started = time.perf_counter()
    if phase == "quantize":
        # The default job's base (core.bases.job_quant_config of the API's default hyperparameters).
        config = QuantConfig(method="optq", bits=4, group_size=128)
        quantize_model(source, config, out, lambda done, total: print(f"  layer {done}/{total}", flush=True))
    else:
        from modulora.models import load_model

        model, _ = load_model(out, device=device)
        del model
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak_gpu = torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None
    # ru_maxrss: the process's peak resident set in KiB (Linux).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    return {"device": str(device), "s": seconds, "rss_gib": rss, "gpu_gib": peak_gpu}


def _run_child(phase: str, source: Path, out: Path) -> dict:
    command = [sys.executable, "-m", "bench.quantize_stream", "--child", phase, str(source), str(out)]
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    lines = result.stdout.strip().splitlines()
    print("\n".join(lines[:-1][-3:]))
    return json.loads(lines[-1])


def _folder_gib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / GIB


def bench_shape(shape: str, workdir: Path) -> dict:
    source, out = workdir / f"llama-{shape}", workdir / f"llama-{shape}-optq4"
    started = time.perf_counter()
    write_synthetic_llama(source, shape, smollm2_tokenizer_dir())
    row: dict = {
        "shape": shape,
        "write_s": time.perf_counter() - started,
        "checkpoint_gib": _folder_gib(source),
    }
    quantize = _run_child("quantize", source, out)
    load = _run_child("load", source, out)
    row.update(
        device=quantize["device"],
        quantize_s=quantize["s"], quantize_rss_gib=quantize["rss_gib"], quantize_gpu_gib=quantize["gpu_gib"],
        load_s=load["s"], load_rss_gib=load["rss_gib"], load_gpu_gib=load["gpu_gib"],
        quantized_gib=_folder_gib(out),
    )  # fmt: skip
    return row


def check_targets(rows: list[dict]) -> list[str]:
    """The issue's targets each row can be judged against, as 'PASS ...' / 'FAIL ...' lines."""
    by_shape = {r["shape"]: r for r in rows}
    verdicts = []
    if "7b" in by_shape:
        r = by_shape["7b"]
        ok = r["quantize_rss_gib"] * GIB <= RSS_7B_LIMIT
        verdicts.append(f"{'PASS' if ok else 'FAIL'} 7b peak RSS {r['quantize_rss_gib']:.2f} GiB <= 6 GiB")
        ok = r["quantize_s"] <= TIME_7B_LIMIT_S
        verdicts.append(
            f"{'PASS' if ok else 'FAIL'} 7b quantize {r['quantize_s']:.0f} s <= {TIME_7B_LIMIT_S:.0f} s"
        )
    if "7b" in by_shape and "13b" in by_shape:
        growth = by_shape["13b"]["quantize_rss_gib"] - by_shape["7b"]["quantize_rss_gib"]
        ok = growth * GIB <= RSS_GROWTH_LIMIT
        verdicts.append(f"{'PASS' if ok else 'FAIL'} 13b peak RSS - 7b = {growth:+.2f} GiB <= 0.5 GiB")
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["7b", "13b"])
    parser.add_argument("--out", help="JSON file or folder (default: $OUT or the current folder)")
    parser.add_argument("--workdir", help="where checkpoints are written (default: a temporary folder)")
    parser.add_argument("--child", nargs=3, metavar=("PHASE", "SOURCE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        phase, source, out = args.child
        print(json.dumps(_measure(phase, source, out)))
        return
    rows = []
    for shape in args.shapes:
        # One shape's checkpoints at a time: a 13B one is 26 GB of bf16, and disks are finite.
        with tempfile.TemporaryDirectory(dir=args.workdir, prefix=f"quantize-stream-{shape}-") as workdir:
            rows.append(bench_shape(shape, Path(workdir)))
        print_table(rows[-1:], COLUMNS)
    print()
    print_table(rows, COLUMNS)
    verdicts = check_targets(rows)
    print("\n".join(verdicts))
    path = write_json(
        "quantize_stream.json", {"environment": environment(), "rows": rows, "targets": verdicts}, args.out
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
