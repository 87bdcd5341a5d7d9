"""Bandwidth and speed of every low-bit kernel on the current GPU, against the copy bandwidth.

    python bench/kernels.py [--out $OUT/kernels.json] [--quick]

Prints a table and writes JSON (to $OUT on the device machine). Every kernel is checked against its
PyTorch reference once before it is timed. Bytes are the fewest the op must move: packed weight
(+ scales, zeros, g_idx) read once, plus its output (or x and y) written/read once. Weights rotate
over enough copies that each timed call streams from HBM, not the 50 MB L2.

`copy_ratio` is a kernel's GB/s over the 1 GiB copy's. Below a few hundred MB, launch, ramp and
tail cost every kernel a share of that rate, so `ceiling_ratio` gives the same ratio for the least
work that moves the kernel's bytes at the same size, timed the same way: for materialize, a fill of
the dense output (the bulk of its bytes; the faster of PyTorch's `zero_` and `_write_zeros`); for the
one-row matmul, `_read_words`, which only loads the packed words, over the grid of the fastest
one-row configuration.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (  # noqa: E402
    copies_for,
    do_bench_ms,
    environment,
    graph_bench_ms,
    print_table,
    random_gptq_buffers,
    rotating,
    write_json,
)
from gpu_kernels._dispatch import dependent_launch  # noqa: E402
from gpu_kernels._pdl import wait_for_inputs  # noqa: E402
from gpu_kernels.gptq_gemv import (  # noqa: E402
    GEMV_BITS,
    gemv_candidates,
    gemv_tile_words,
    gptq_gemv,
    words_per_split,
)
from gpu_kernels.gptq_matmul import FUSED_BITS, gptq_matmul_ref, gptq_matmul_triton  # noqa: E402
from gpu_kernels.materialize_gguf import materialize_gguf_ref, materialize_gguf_triton  # noqa: E402
from gpu_kernels.materialize_gptq import materialize_gptq_ref, materialize_gptq_triton  # noqa: E402
from gpu_kernels.materialize_nf4 import materialize_nf4_ref, materialize_nf4_triton  # noqa: E402

DEV = "cuda"
# LLaMA-7B's two MLP shapes (in, out) and its attention shape; 65B's largest.
SHAPES = [(4096, 11008), (11008, 4096), (4096, 4096), (8192, 22016)]
SECTIONS = ("materialize", "decode", "training")


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, counting bytes read plus bytes written (GB/s)."""
    src = torch.randn(2**29, device=DEV, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = do_bench_ms(lambda: dst.copy_(src))
    return 2 * nbytes(src) / ms / 1e6


def ceiling_gbps(op: Callable[..., object], inputs: list[tuple], moved: int) -> float:
    return moved / graph_bench_ms(op, inputs) / 1e6


@triton.jit
def _read_words(q_ptr, out_ptr, per_split, words, N, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr,
                PDL: tl.constexpr):  # fmt: skip
    """The one-row kernel's weight loads and nothing else: program (n, s) XORs the packed words of
    split s in column block n, with the same grid, launch and cache policy."""
    wait_for_inputs(PDL)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    w_begin = tl.program_id(1) * per_split
    w_end = tl.minimum(w_begin + per_split, words)
    acc = tl.zeros((BLOCK_N,), tl.int32)
    for w in range(w_begin, w_end, BLOCK_W):
        for i in tl.static_range(BLOCK_W):
            mask = offs_n < tl.where(w + i < w_end, N, 0)
            acc ^= tl.load(q_ptr + (w + i) * N + offs_n, mask=mask, other=0, eviction_policy="evict_first")
    tl.store(out_ptr + offs_n, acc, mask=offs_n < N)


def read_words(qweight: torch.Tensor, config: dict) -> torch.Tensor:
    words, n = qweight.shape
    per_split = words_per_split(words, config["SPLIT_K"], config["BLOCK_W"])
    grid = (triton.cdiv(n, config["BLOCK_N"]), triton.cdiv(words, per_split))
    out = torch.empty(n, dtype=torch.int32, device=qweight.device)
    launch = {k: v for k, v in config.items() if k != "SPLIT_K"}
    _read_words[grid](qweight, out, per_split, words, n, **launch, **dependent_launch(qweight.device))
    return out


@triton.jit
def _write_zeros(out_ptr, n, BLOCK: tl.constexpr):
    """Stores and nothing else: zeros over the output, a block of BLOCK values per program."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.zeros((BLOCK,), out_ptr.dtype.element_ty), mask=offs < n)


def write_zeros(out: torch.Tensor, block: int = 8192) -> torch.Tensor:
    _write_zeros[(triton.cdiv(out.numel(), block),)](out, out.numel(), BLOCK=block, num_warps=8)
    return out


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30)).item()


def bench_materialize_gptq(rows: list, shapes: list, bit_widths: tuple, act_order: bool = False) -> None:
    for bits in bit_widths:
        for in_f, out_f in shapes:
            bufs = random_gptq_buffers(in_f, out_f, bits, 128, DEV)
            if act_order:
                bufs["g_idx"] = bufs["g_idx"][torch.randperm(in_f, device=DEV)].contiguous()
            args = (bufs["qweight"], bufs["qzeros"], bufs["scales"], bufs["g_idx"], bits, 1, torch.bfloat16)
            err = rel_err(materialize_gptq_triton(*args), materialize_gptq_ref(*args))
            # The reference leaves gigabytes of temporaries cached in the allocator; timed with them
            # there, the same kernel measures lower.
            torch.cuda.empty_cache()
            moved = nbytes(*bufs.values()) + in_f * out_f * 2
            sets = [tuple(args)] + [
                (*random_gptq_buffers(in_f, out_f, bits, 128, DEV).values(), bits, 1, torch.bfloat16)
                for _ in range(copies_for(moved) - 1)
            ]
            if act_order:
                sets = [(q, z, s, bufs["g_idx"], *rest) for q, z, s, _, *rest in sets]
            ms = graph_bench_ms(materialize_gptq_triton, sets)
            name = f"materialize gptq {bits}b" + (" act-order" if act_order else "")
            outputs = [(torch.empty(out_f, in_f, device=DEV, dtype=torch.bfloat16),) for _ in sets]
            fill_gbps = max(
                ceiling_gbps(op, outputs, in_f * out_f * 2) for op in (torch.Tensor.zero_, write_zeros)
            )
            del outputs
            rows.append(dict(kernel=name, shape=f"{out_f}x{in_f}", ms=ms, gbps=moved / ms / 1e6, rel_err=err,
                             ceiling_gbps=fill_gbps))  # fmt: skip


def bench_materialize_nf4(rows: list, out_f: int, in_f: int) -> None:
    n_blocks = out_f * in_f // 64
    make = lambda: (  # noqa: E731
        torch.randint(0, 256, (n_blocks * 32,), dtype=torch.uint8, device=DEV),
        torch.rand(n_blocks, device=DEV),
        out_f, in_f, 64, torch.bfloat16,
    )  # fmt: skip
    first = make()
    err = rel_err(materialize_nf4_triton(*first), materialize_nf4_ref(*first))
    moved = nbytes(first[0], first[1]) + out_f * in_f * 2
    ms = do_bench_ms(
        rotating(materialize_nf4_triton, [first] + [make() for _ in range(copies_for(moved) - 1)])
    )
    rows.append(
        dict(
            kernel="materialize nf4 (ours)",
            shape=f"{out_f}x{in_f}",
            ms=ms,
            gbps=moved / ms / 1e6,
            rel_err=err,
        )
    )
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        return
    sets = []
    for _ in range(copies_for(moved)):
        w = torch.randn(out_f, in_f, device=DEV, dtype=torch.bfloat16)
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
        sets.append((packed, state))
    moved_bnb = nbytes(sets[0][0], sets[0][1].absmax) + out_f * in_f * 2
    ms = do_bench_ms(rotating(lambda p, s: bnbf.dequantize_4bit(p, s, quant_type="nf4"), sets))
    rows.append(
        dict(
            kernel="materialize nf4 (bitsandbytes)", shape=f"{out_f}x{in_f}", ms=ms, gbps=moved_bnb / ms / 1e6
        )
    )


def bench_materialize_gguf(rows: list, out_f: int, in_f: int) -> None:
    for qtype in ("q4_0", "q4_1", "q8_0"):

        def make(qtype: str = qtype) -> tuple:
            if qtype == "q8_0":
                qs = torch.randint(-128, 128, (out_f, in_f), dtype=torch.int8, device=DEV)
            else:
                qs = torch.randint(0, 256, (out_f, in_f // 2), dtype=torch.uint8, device=DEV)
            scales = (torch.rand(out_f, in_f // 32, device=DEV) / 100).half()
            mins = (torch.randn(out_f, in_f // 32, device=DEV) / 100).half() if qtype == "q4_1" else None
            return qs, scales, mins, qtype, torch.bfloat16

        first = make()
        err = rel_err(materialize_gguf_triton(*first), materialize_gguf_ref(*first))
        moved = nbytes(*(t for t in first[:3] if t is not None)) + out_f * in_f * 2
        ms = do_bench_ms(
            rotating(materialize_gguf_triton, [first] + [make() for _ in range(copies_for(moved) - 1)])
        )
        rows.append(
            dict(
                kernel=f"materialize gguf {qtype}",
                shape=f"{out_f}x{in_f}",
                ms=ms,
                gbps=moved / ms / 1e6,
                rel_err=err,
            )
        )


def _materialized_linear(x: torch.Tensor, *packed_and_flags: object) -> torch.Tensor:
    *packed, bits, zero_offset = packed_and_flags
    return F.linear(x, materialize_gptq_triton(*packed, bits, zero_offset, x.dtype))


def _tile_matmul(x: torch.Tensor, *packed_and_flags: object) -> torch.Tensor:
    return gptq_matmul_triton(x, *packed_and_flags)


def _gemv(config: dict | None = None) -> Callable[..., torch.Tensor]:
    return lambda x, *packed_and_flags: gptq_gemv(x, *packed_and_flags, config=config)


def bench_decode(rows: list, shapes: list, bit_widths: tuple, row_counts: tuple) -> None:
    """Few-row matmuls: the batch-1 kernel (`gptq_gemv`) and the fused tile kernel (2/4/8 bits) against
    materialize + cuBLAS and a bf16 cuBLAS GEMV over the dense weight; `choice` is the fastest.

    Device time per call from CUDA-graph replays (`graph_bench_ms`): at a few microseconds per
    call an eager loop measures the launch, not the kernel. `eager_ms` is the chosen call eagerly.
    At M = 1 every GEMV tile candidate is timed too (`gemv_configs`), streaming from HBM, where the
    launcher's own pick times them on one weight (from L2 when it fits).
    """
    for in_f, out_f in shapes:
        for m in row_counts:
            x = torch.randn(m, in_f, device=DEV, dtype=torch.bfloat16)
            w_bytes = in_f * out_f * 2
            dense = [
                (x, torch.randn(out_f, in_f, device=DEV, dtype=torch.bfloat16))
                for _ in range(copies_for(w_bytes))
            ]
            ms = graph_bench_ms(F.linear, dense)
            moved = w_bytes + nbytes(x) + m * out_f * 2
            rows.append(
                dict(
                    kernel=f"decode bf16 cuBLAS M={m}", shape=f"{out_f}x{in_f}", ms=ms, gbps=moved / ms / 1e6
                )
            )
            for bits in bit_widths:
                bufs = random_gptq_buffers(in_f, out_f, bits, 128, DEV)
                args = (x, *bufs.values(), bits, 1)
                moved = nbytes(*bufs.values()) + nbytes(x) + m * out_f * 2
                sets = [args] + [
                    (x, *random_gptq_buffers(in_f, out_f, bits, 128, DEV).values(), bits, 1)
                    for _ in range(copies_for(moved) - 1)
                ]
                variants = {"materialize+cublas": _materialized_linear}
                if bits in FUSED_BITS:
                    variants |= {"tile": _tile_matmul, "gemv": _gemv()}
                times = {name: graph_bench_ms(fn, sets) for name, fn in variants.items()}
                choice = min(times, key=times.__getitem__)
                want = gptq_matmul_ref(x.double(), *bufs.values(), bits, 1, False)
                row = dict(kernel=f"decode gptq {bits}b M={m}", shape=f"{out_f}x{in_f}", ms=times[choice],
                           gbps=moved / times[choice] / 1e6, choice=choice,
                           **{f"{name}_ms": t for name, t in times.items()},
                           rel_err=max(rel_err(fn(*args), want) for fn in variants.values()),
                           eager_ms=do_bench_ms(rotating(variants[choice], sets)))  # fmt: skip
                if m == 1 and bits in GEMV_BITS:
                    tile_words = gemv_tile_words(bits, 128, bufs["scales"].shape[0])
                    configs = gemv_candidates(in_f, out_f, bits, tile_words)
                    row["gemv_configs"] = {str(cfg): graph_bench_ms(_gemv(cfg), sets) for cfg in configs}
                    fastest = min(configs, key=lambda cfg: row["gemv_configs"][str(cfg)])
                    row["ceiling_gbps"] = ceiling_gbps(
                        functools.partial(read_words, config=fastest),
                        [(s[1],) for s in sets],
                        nbytes(bufs["qweight"]),
                    )
                rows.append(row)


def _materialized_matmul(x: torch.Tensor, packed: tuple, bits: int, transpose: bool) -> torch.Tensor:
    dense = materialize_gptq_triton(*packed, bits, 1, torch.bfloat16)
    return x @ dense if transpose else x @ dense.T


def _dense_matmul(x: torch.Tensor, w: torch.Tensor, transpose: bool) -> torch.Tensor:
    return x @ w if transpose else x @ w.T


def bench_training(rows: list, shapes: list, bit_widths: tuple, row_counts: tuple) -> None:
    """Fused dequant-GEMM vs materialize + cuBLAS vs plain bf16 cuBLAS, forward and input gradient."""
    for in_f, out_f in shapes:
        for bits in bit_widths:
            packed = tuple(random_gptq_buffers(in_f, out_f, bits, 128, DEV).values())
            w = materialize_gptq_triton(*packed, bits, 1, torch.bfloat16)
            for m in row_counts:
                for transpose in (False, True):
                    x = torch.randn(m, out_f if transpose else in_f, device=DEV, dtype=torch.bfloat16)
                    variants = {
                        "fused": functools.partial(gptq_matmul_triton, x, *packed, bits, 1, transpose),
                        "materialize+cublas": functools.partial(
                            _materialized_matmul, x, packed, bits, transpose
                        ),
                        "bf16 cublas": functools.partial(_dense_matmul, x, w, transpose),
                    }
                    err = rel_err(variants["fused"](), variants["bf16 cublas"]())
                    times = {name: do_bench_ms(fn) for name, fn in variants.items()}
                    best = min(("fused", "materialize+cublas"), key=times.__getitem__)
                    rows.append(
                        dict(
                            kernel=f"train gptq {bits}b M={m} {'dX=dY.W' if transpose else 'Y=X.Wt'}",
                            shape=f"{out_f}x{in_f}",
                            ms=times[best],
                            fused_ms=times["fused"],
                            materialize_ms=times["materialize+cublas"],
                            bf16_ms=times["bf16 cublas"],
                            tflops=2 * m * in_f * out_f / times[best] / 1e9,
                            choice=best,
                            rel_err=err,
                        )
                    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON file or folder (default: $OUT or the current folder)")
    parser.add_argument("--quick", action="store_true", help="one shape per section (a smoke run)")
    parser.add_argument(
        "--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS), help="what to measure"
    )
    parser.add_argument(
        "--training-rows", default="128,512,2048,4096", help="M values of the training matmuls"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    shapes = SHAPES[:1] if args.quick else SHAPES
    copy_gbps = copy_bandwidth()
    rows: list[dict] = []
    sections = set(args.sections)
    if "materialize" in sections:
        bench_materialize_gptq(rows, shapes, (2, 3, 4, 8))
        bench_materialize_gptq(rows, shapes[:1], (3, 4), act_order=True)
        bench_materialize_nf4(rows, 11008, 4096)
        bench_materialize_gguf(rows, 11008, 4096)
    if "decode" in sections:
        bench_decode(rows, shapes, (2, 3, 4), (1, 2, 4, 16))
    if "training" in sections:
        training_rows = tuple(int(m) for m in args.training_rows.split(",") if m)
        bench_training(rows, shapes[:3] if not args.quick else shapes, (2, 4), training_rows)
    for r in rows:
        if "gbps" in r:
            r["copy_ratio"] = r["gbps"] / copy_gbps
        if "ceiling_gbps" in r:
            r["ceiling_ratio"] = r["ceiling_gbps"] / copy_gbps
    print(f"copy bandwidth (read + write): {copy_gbps:.0f} GB/s")
    print_table(
        [r for r in rows if "gbps" in r],
        [
            "kernel",
            "shape",
            "ms",
            "gbps",
            "copy_ratio",
            "ceiling_ratio",
            "rel_err",
            "eager_ms",
            "gemv_ms",
            "tile_ms",
            "materialize+cublas_ms",
            "choice",
        ],
    )
    print()
    print_table(
        [r for r in rows if "fused_ms" in r],
        ["kernel", "shape", "fused_ms", "materialize_ms", "bf16_ms", "choice", "tflops", "rel_err"],
    )
    path = write_json(
        "kernels.json", dict(environment=environment(), copy_gbps=copy_gbps, rows=rows), args.out
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
