"""QuIP# kernels on the current GPU: Hadamard transforms, E8P decode, few-row products, a decode step.

    python -m bench.quip_kernels [--out $OUT/quip_kernels.json]
    BENCH_DEVICE=cpu TRITON_INTERPRET=1 python -m bench.quip_kernels --out /tmp/  # smoke test, tiny sizes

Prints tables and writes JSON (to $OUT on the device machine). Every kernel is checked against its
PyTorch reference before it is timed. Times are device milliseconds per call from CUDA-graph
replays (`bench._common.graph_bench_ms`: no launch cost, as the graphed training step and the
inference engine run them), over enough input copies that each call reads from HBM, not L2. On
the CPU (smoke test) they are one call's wall time under Triton's interpreter and mean nothing.
- transforms: the fused Triton transform (bf16 in, signs, fp32 inside, bf16 out) at 7B/65B orders
  against the PyTorch reference path (`hadamard_ref`: fp32 butterflies, K×K fp32 matmul), for the
  input side (x·su, then H) and the output side (Hᵀ, then ·sv); GB/s counts x read + y written;
- materialize: E8P decode of a whole weight to bf16 (codes read + tile written), each tile;
- few-row products: the fused split-K decode-matmul (tile chosen by timing) against decode +
  cuBLAS, a dense bf16 matmul and GPTQ 2-bit's one-row kernel (`gptq_gemv`) at the same shape;
- decode step: the linears of every layer of a LLaMA-7B at batch 1 as the engine would run them
  (q/k/v and gate/up fused: input transforms, one product, output transforms), QuIP# against GPTQ
  2-bit's one-row kernels; with GPTQ 2-bit's measured decode rate this projects QuIP#'s.
Only `gpu_kernels` is imported, so the script runs where the library's service deps are absent.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (  # noqa: E402
    copies_for,
    environment,
    graph_bench_ms,
    print_table,
    random_gptq_buffers,
    write_json,
)
from gpu_kernels.e8p import DECODE_CANDIDATES, e8p_decode_ref, e8p_decode_triton  # noqa: E402
from gpu_kernels.e8p_matmul import e8p_matmul_grouped, e8p_matmul_triton  # noqa: E402
from gpu_kernels.gptq_gemv import gptq_gemv  # noqa: E402
from gpu_kernels.hadamard import hadamard, hadamard_factors, hadamard_ref  # noqa: E402
from gpu_kernels.swiglu import silu_mul  # noqa: E402

DEV = os.environ.get("BENCH_DEVICE", "cuda")
SMOKE = DEV == "cpu"
# GPTQ 2-bit at batch 1 on the engine (docs/benchmarks.md, decode table): the projection baseline.
GPTQ_2BIT_DECODE_TOK_S = 446.7
if SMOKE:
    ORDERS, ROW_COUNTS = [128, 160, 96], [16, 1]
    SHAPES = [(160, 96), (96, 160)]  # (out_features, in_features)
    MODEL = (96, 160, 2)  # hidden, intermediate, layers
else:
    ORDERS, ROW_COUNTS = [4096, 11008, 8192, 22016], [512, 1]
    SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (22016, 8192)]  # 7B attention, MLP; 65B MLP
    MODEL = (4096, 11008, 32)  # LLaMA-7B


def device_ms(fn: Callable[..., object], inputs: list[tuple]) -> float:
    """Device ms per call (CUDA-graph replays cycling over `inputs`); on CPU one call's wall time."""
    if SMOKE:
        start = time.perf_counter()
        fn(*inputs[0])
        return (time.perf_counter() - start) * 1e3
    return graph_bench_ms(fn, inputs)


def copies(nbytes: int) -> int:
    return 1 if SMOKE else copies_for(nbytes)


def copy_gbps() -> float:
    if SMOKE:
        return float("nan")
    x = torch.empty(2**28, device=DEV, dtype=torch.float32)  # 1 GiB
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / device_ms(lambda: y.copy_(x), [()]) / 1e6


def random_codes(out_features: int, in_features: int) -> torch.Tensor:
    return torch.randint(-(2**15), 2**15, (out_features, in_features // 8), dtype=torch.int16, device=DEV)


def signs(n: int, groups: int | None = None) -> torch.Tensor:
    """Real-valued sign vectors, as sign tuning leaves them."""
    return torch.randn(n if groups is None else (groups, n), device=DEV)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def check_kernels() -> None:
    for n in ORDERS:
        x, su = torch.randn(37, n, device=DEV).bfloat16(), signs(n)
        for transpose in (False, True):
            got = hadamard(x, transpose, pre_scale=su)
            assert relative_error(got, hadamard_ref(x, transpose, pre_scale=su)) < 1e-2, (n, transpose)
    codes = random_codes(*SHAPES[0])
    assert torch.equal(e8p_decode_triton(codes, torch.bfloat16), e8p_decode_ref(codes, torch.bfloat16))
    dense = e8p_decode_ref(codes, torch.float64)
    for rows in (1, 5):
        x = torch.randn(rows, SHAPES[0][1], device=DEV).bfloat16()
        assert relative_error(e8p_matmul_triton(x, codes), x.double() @ dense.T) < 1e-2, rows


def bench_transforms(copy: float) -> list[dict]:
    rows = []
    for n in ORDERS:
        k, _ = hadamard_factors(n)
        for count in ROW_COUNTS:
            nbytes = 2 * count * n * 2
            inputs = [(torch.randn(count, n, device=DEV).bfloat16(), signs(n)) for _ in range(copies(nbytes))]
            for side, transpose, scale in (
                ("in: ·su, H", False, "pre_scale"),
                ("out: Hᵀ, ·sv", True, "post_scale"),
            ):
                kernel = device_ms(lambda x, s, t=transpose, a=scale: hadamard(x, t, **{a: s}), inputs)
                reference = device_ms(lambda x, s, t=transpose, a=scale: hadamard_ref(x, t, **{a: s}), inputs)
                gbps = nbytes / kernel / 1e6
                rows.append({"n": n, "K": k, "rows": count, "side": side, "kernel ms": kernel,
                             "reference ms": reference, "speedup": reference / kernel,
                             "GB/s": gbps, "% copy": 100 * gbps / copy})  # fmt: skip
    return rows


def bench_materialize(copy: float) -> list[dict]:
    rows = []
    for out_features, in_features in SHAPES:
        nbytes = out_features * in_features * (2 + 2 / 8)  # codes read, bf16 tile written
        inputs = [(random_codes(out_features, in_features),) for _ in range(copies(int(nbytes)))]
        configs = {"default (timed)": None} | {
            f"{c['BLOCK_M']}x{c['BLOCK_G']}/{c['num_warps']}w": c for c in DECODE_CANDIDATES
        }
        for name, config in configs.items():
            ms = device_ms(lambda codes, c=config: e8p_decode_triton(codes, torch.bfloat16, c), inputs)
            rows.append({"shape": f"{out_features}x{in_features}", "tile": name, "ms": ms,
                         "GB/s": nbytes / ms / 1e6, "% copy": 100 * nbytes / ms / 1e6 / copy})  # fmt: skip
    return rows


def gptq_2bit(out_features: int, in_features: int) -> tuple:
    bufs = random_gptq_buffers(in_features, out_features, 2, 128, DEV)
    return bufs["qweight"], bufs["qzeros"], bufs["scales"], bufs["g_idx"], 2


def bench_few_rows() -> list[dict]:
    rows = []
    for out_features, in_features in SHAPES:
        nbytes = out_features * in_features // 4
        weights = [(random_codes(out_features, in_features),) for _ in range(copies(nbytes))]
        dense = [
            (torch.randn(out_features, in_features, device=DEV).bfloat16(),)
            for _ in range(copies(nbytes * 8))
        ]
        gptq = [gptq_2bit(out_features, in_features) for _ in range(copies(nbytes))]
        for m in (1, 16):
            x = torch.randn(m, in_features, device=DEV).bfloat16()
            fused = device_ms(lambda codes, x=x: e8p_matmul_triton(x, codes), weights)
            decoded = device_ms(lambda codes, x=x: F.linear(x, e8p_decode_triton(codes, x.dtype)), weights)
            row = {"shape": f"{m}x{in_features}->{out_features}", "fused ms": fused,
                   "decode+linear ms": decoded,
                   "dense bf16 ms": device_ms(lambda w, x=x: F.linear(x, w), dense),
                   "codes GB/s": nbytes / fused / 1e6}  # fmt: skip
            if m == 1:
                row["gptq 2-bit ms"] = device_ms(lambda *packed, x=x: gptq_gemv(x, *packed), gptq)
            rows.append(row)
    return rows


class QuipBlock:
    """One decoder layer's seven QuIP# linears, fused as the engine runs them (`E8PProjections`)."""

    def __init__(self, hidden: int, inter: int) -> None:
        self.qkv = (random_codes(3 * hidden, hidden), signs(hidden, 3), signs(hidden, 3) / hidden**0.5)
        self.o = (random_codes(hidden, hidden), signs(hidden, 1), signs(hidden, 1) / hidden**0.5)
        self.gate_up = (random_codes(2 * inter, hidden), signs(hidden, 2), signs(inter, 2) / hidden**0.5)
        self.down = (random_codes(hidden, inter), signs(inter, 1), signs(hidden, 1) / inter**0.5)

    @staticmethod
    def product(x: torch.Tensor, codes: torch.Tensor, su: torch.Tensor, sv: torch.Tensor) -> torch.Tensor:
        """x [1, in] -> [1, G, out]: G projections of x, each with its own signs."""
        groups, width = sv.shape
        rotated = hadamard(x[:, None, :], pre_scale=su)
        y = e8p_matmul_grouped(rotated, codes, [width] * groups)
        return hadamard(y.view(1, groups, width), transpose=True, post_scale=sv)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        q = self.product(h, *self.qkv)[:, 0]  # attention's output stands in for itself
        h = self.product(q, *self.o)[:, 0]
        gate, up = self.product(h, *self.gate_up).unbind(1)
        return self.product(silu_mul(gate, up), *self.down)[:, 0]


class GptqBlock:
    """The same layer in GPTQ 2-bit through its one-row kernel, q/k/v and gate/up fused."""

    def __init__(self, hidden: int, inter: int) -> None:
        self.hidden, self.inter = hidden, inter
        self.qkv, self.o = gptq_2bit(3 * hidden, hidden), gptq_2bit(hidden, hidden)
        self.gate_up, self.down = gptq_2bit(2 * inter, hidden), gptq_2bit(hidden, inter)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        q = gptq_gemv(h, *self.qkv)[:, : self.hidden]
        h = gptq_gemv(q, *self.o)
        gate_up = gptq_gemv(h, *self.gate_up)
        return gptq_gemv(silu_mul(gate_up[:, : self.inter], gate_up[:, self.inter :]), *self.down)


def bench_decode_step() -> list[dict]:
    hidden, inter, layers = MODEL
    x = torch.randn(1, hidden, device=DEV).bfloat16()
    rows = []
    for name, block in (("quip# 2-bit", QuipBlock), ("gptq 2-bit", GptqBlock)):
        blocks = [block(hidden, inter) for _ in range(layers)]

        def step(h: torch.Tensor, blocks: list = blocks) -> torch.Tensor:
            for b in blocks:
                h = b(h)
            return h

        rows.append({"method": name, "layers": layers, "linears ms/token": device_ms(step, [(x,)])})
        del blocks
    quip_ms, gptq_ms = rows[0]["linears ms/token"], rows[1]["linears ms/token"]
    # The rest of a step (attention, norms, head, gaps) is what GPTQ 2-bit's measured rate leaves.
    if not SMOKE:
        projected = 1e3 / (1e3 / GPTQ_2BIT_DECODE_TOK_S - gptq_ms + quip_ms)
        rows[0]["projected tok/s"], rows[1]["projected tok/s"] = projected, GPTQ_2BIT_DECODE_TOK_S
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=None, help="JSON file or folder (default: $OUT or .)")
    args = parser.parse_args()
    torch.manual_seed(0)
    check_kernels()
    copy = copy_gbps()
    print(f"copy bandwidth: {copy:.0f} GB/s (read + write)")
    transforms = bench_transforms(copy)
    print_table(
        transforms, ["n", "K", "rows", "side", "kernel ms", "reference ms", "speedup", "GB/s", "% copy"]
    )
    materialize = bench_materialize(copy)
    print_table(materialize, ["shape", "tile", "ms", "GB/s", "% copy"])
    few_rows = bench_few_rows()
    columns = ["shape", "fused ms", "decode+linear ms", "dense bf16 ms", "gptq 2-bit ms", "codes GB/s"]
    print_table(few_rows, columns)
    decode_step = bench_decode_step()
    print_table(decode_step, ["method", "layers", "linears ms/token", "projected tok/s"])
    payload = {"environment": environment(), "smoke": SMOKE, "copy_GBps": copy, "transforms": transforms,
               "materialize": materialize, "few_rows": few_rows, "decode_step": decode_step}  # fmt: skip
    print("wrote", write_json("quip_kernels.json", payload, args.out))


if __name__ == "__main__":
    main()
