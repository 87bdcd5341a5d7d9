"""Shared helpers for the GPU benchmarks: timing, random packed weights, JSON output."""

from __future__ import annotations

import itertools
import json
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

# The benchmarks' data (never shipped): the shared datasets beside the checkout.
SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
C4_VALIDATION = SHARED_DATASETS / "c4" / "c4_validation_2k.jsonl"
WIKITEXT2_TEST = SHARED_DATASETS / "wikitext2" / "wiki.test.raw"


def do_bench_ms(fn: Callable[[], Any], warmup_ms: int = 25, rep_ms: int = 200) -> float:
    """Median milliseconds per call (CUDA events, Triton's `do_bench`)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def graph_bench_ms(
    fn: Callable[..., Any], inputs: Sequence[Any], replays: int = 20, batches: int = 5
) -> float:
    """Device milliseconds per call without launch overhead: one CUDA graph calls `fn(*inputs[i])`
    once per input set (so each call reads from HBM). After one batch of `replays` replays as a
    warm-up, `batches` batches are timed with events, and the median batch counts: a single batch
    of a few milliseconds moves by several points of bandwidth between measurements.

    For kernels of a few microseconds (decode matmuls), which an eager loop cannot launch as fast as
    the GPU runs them; the inference engine runs its decode steps as CUDA graphs too.
    """
    for args in inputs:  # compile and pick tile configurations before capture
        fn(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in inputs:
            fn(*args)
    for _ in range(replays):
        graph.replay()
    times = []
    for _ in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times) / (replays * len(inputs))


def rotating(fn: Callable[..., Any], inputs: Sequence[Any]) -> Callable[[], Any]:
    """Call `fn(*inputs[i])` cycling over several input sets, so repeated calls miss the L2 cache."""
    cycle = itertools.cycle(inputs)
    return lambda: fn(*next(cycle))


def copies_for(nbytes: int, l2_bytes: int = 50 * 2**20, floor: int = 2) -> int:
    """How many distinct input sets make each pass read from HBM rather than L2 (4x the L2)."""
    return max(floor, -(-4 * l2_bytes // max(nbytes, 1)))


def random_gptq_buffers(in_features: int, out_features: int, bits: int, group_size: int, device: str) -> dict:
    """Random packed GPTQ tensors (v1 zeros, no act-order): uniform codes, scales that keep W ~ 0.02."""
    groups = 1 if group_size == -1 else -(-in_features // group_size)
    info = torch.iinfo(torch.int32)
    code_std = (2 * (4**bits - 1) / 12) ** 0.5  # std of (code - zero) for independent uniform codes
    return dict(
        qweight=torch.randint(
            info.min, info.max, (-(-in_features * bits // 32), out_features), dtype=torch.int32, device=device
        ),
        qzeros=torch.randint(
            info.min, info.max, (groups, -(-out_features * bits // 32)), dtype=torch.int32, device=device
        ),
        scales=torch.full((groups, out_features), 0.02 / code_std, dtype=torch.float16, device=device)
        * (0.5 + torch.rand(groups, out_features, device=device).half()),
        g_idx=(
            torch.arange(in_features, device=device) // (in_features if group_size == -1 else group_size)
        ).int(),
    )


def environment() -> dict[str, str]:
    info = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_json(name: str, payload: dict, out: str | None) -> Path:
    """Write results to `out` (a file or folder), else to $OUT (the device tool's return folder), else cwd."""
    target = Path(out or os.environ.get("OUT") or ".")
    if target.suffix != ".json":
        target = target / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=1))
    return target


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max([len(c)] + [len(_fmt(r.get(c))) for r in rows]) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths, strict=True)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
