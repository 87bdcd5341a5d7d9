"""QuIP# kernels on the current GPU: E8P decode and the Hadamard transform against copy bandwidth.

    python bench/quip_kernels.py [--out $OUT/quip_kernels.json]

Prints tables and writes JSON (to $OUT on the device machine). Every kernel is checked against its
PyTorch reference before it is timed. Bytes are the fewest the op must move:
- E8P decode ("materialize"): int16 codes read once (2 bits a weight) + the bf16 tile written once;
- Hadamard: x read once + y written once (bf16). Orders with a K factor (576, 1536, 11008) also
  run a K×K fp32 matmul through PyTorch, so they move more than the bytes counted.
- the QuIP# layer forward (sign, Hadamard, decode + bf16 matmul, Hadamard, sign) at 2048 tokens is
  timed against a dense bf16 `F.linear` of the same shape.
Only `gpu_kernels` is imported, so the script runs where the library's service deps are absent.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import do_bench_ms, environment, print_table, write_json  # noqa: E402
from gpu_kernels.e8p import e8p_decode_ref, e8p_decode_triton  # noqa: E402
from gpu_kernels.e8p_matmul import e8p_matmul_triton  # noqa: E402
from gpu_kernels.hadamard import fwht_config, fwht_triton, hadamard, hadamard_factors, hadamard_ref  # noqa: E402

DEV = "cuda"
# (out_features, in_features): LLaMA-7B attention and MLP, LLaMA-65B's largest.
DECODE_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (22016, 8192)]
DECODE_CONFIGS = [
    {"BLOCK_M": 16, "BLOCK_G": 64, "num_warps": 4},
    {"BLOCK_M": 32, "BLOCK_G": 32, "num_warps": 4},
    {"BLOCK_M": 8, "BLOCK_G": 128, "num_warps": 4},
    {"BLOCK_M": 32, "BLOCK_G": 64, "num_warps": 8},
]
HADAMARD_DIMS = [576, 1536, 4096, 8192, 11008]
HADAMARD_ROWS = 8192
FWHT_CONFIGS = [{"BLOCK_M": m, "num_warps": w} for m in (1, 2, 4) for w in (4, 8)]


def copy_gbps() -> float:
    x = torch.empty(2**28, device=DEV, dtype=torch.float32)  # 1 GiB
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / do_bench_ms(lambda: y.copy_(x)) / 1e6


def random_codes(out_features: int, in_features: int) -> torch.Tensor:
    return torch.randint(-(2**15), 2**15, (out_features, in_features // 8), dtype=torch.int16, device=DEV)


def check_kernels() -> None:
    codes = random_codes(300, 1024)
    x = torch.randn(5, 1024, device=DEV, dtype=torch.bfloat16)
    want = x.double().cpu() @ e8p_decode_ref(codes.cpu(), torch.float64).T
    assert ((e8p_matmul_triton(x, codes).double().cpu() - want).norm() / want.norm()).item() < 1e-2
    torch.testing.assert_close(
        e8p_decode_triton(codes, torch.bfloat16).cpu(), e8p_decode_ref(codes.cpu(), torch.bfloat16)
    )
    for n in HADAMARD_DIMS:
        x = torch.randn(37, n, device=DEV)
        for transpose in (False, True):
            torch.testing.assert_close(
                hadamard(x, transpose).cpu(), hadamard_ref(x.cpu(), transpose), rtol=1e-4, atol=1e-4
            )


def bench_decode(copy: float) -> list[dict]:
    rows = []
    for out_features, in_features in DECODE_SHAPES:
        codes = random_codes(out_features, in_features)
        nbytes = codes.numel() * 2 + out_features * in_features * 2
        for config in DECODE_CONFIGS:
            ms = do_bench_ms(functools.partial(e8p_decode_triton, codes, torch.bfloat16, config))
            gbps = nbytes / ms / 1e6
            tile = f"{config['BLOCK_M']}x{config['BLOCK_G']}/{config['num_warps']}w"
            rows.append({"op": "e8p_decode", "shape": f"{out_features}x{in_features}", "config": tile,
                         "ms": ms, "GB/s": gbps, "% copy": 100 * gbps / copy})  # fmt: skip
    return rows


def bench_hadamard(copy: float) -> list[dict]:
    rows = []
    for n in HADAMARD_DIMS:
        x = torch.randn(HADAMARD_ROWS, n, device=DEV, dtype=torch.bfloat16)
        nbytes = 2 * x.numel() * x.element_size()
        k, p = hadamard_factors(n)
        timings = {"default": do_bench_ms(functools.partial(hadamard, x))}
        if k == 1:
            for config in FWHT_CONFIGS:
                name = f"{config['BLOCK_M']} rows/{config['num_warps']}w"
                timings[name] = do_bench_ms(
                    functools.partial(fwht_triton, x, 1 / math.sqrt(n), x.dtype, config)
                )
        for name, ms in timings.items():
            if name == "default":
                name = f"default K={k}" + (f" ({fwht_config(p)['BLOCK_M']} rows)" if k == 1 else "")
            gbps = nbytes / ms / 1e6
            rows.append({"op": "hadamard", "shape": f"{HADAMARD_ROWS}x{n}", "config": name,
                         "ms": ms, "GB/s": gbps, "% copy": 100 * gbps / copy})  # fmt: skip
    return rows


def quip_forward(x: torch.Tensor, codes: torch.Tensor, su: torch.Tensor, sv: torch.Tensor) -> torch.Tensor:
    """E8PLinear.matmul in bf16: signs and Hadamards in fp32, decode + matmul in bf16."""
    rotated = hadamard(x.float() * su).to(torch.bfloat16)
    y = F.linear(rotated, e8p_decode_triton(codes, torch.bfloat16))
    return (hadamard(y.float(), transpose=True) * sv).to(torch.bfloat16)


def bench_layer(tokens: int = 2048) -> list[dict]:
    rows = []
    for out_features, in_features in DECODE_SHAPES[:3]:
        codes = random_codes(out_features, in_features)
        su = torch.randn(in_features, device=DEV).sign()
        sv = torch.randn(out_features, device=DEV).sign() * 0.01
        x = torch.randn(tokens, in_features, device=DEV, dtype=torch.bfloat16)
        dense = torch.randn(out_features, in_features, device=DEV, dtype=torch.bfloat16) * 0.01

        quip_ms = do_bench_ms(functools.partial(quip_forward, x, codes, su, sv))
        dense_ms = do_bench_ms(functools.partial(F.linear, x, dense))
        decode_ms = do_bench_ms(functools.partial(e8p_decode_triton, codes, torch.bfloat16))
        rows.append({"shape": f"{tokens}x{in_features}->{out_features}", "quip# ms": quip_ms,
                     "decode ms": decode_ms, "dense ms": dense_ms, "ratio": quip_ms / dense_ms})  # fmt: skip
    return rows


def decode_then_linear(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return F.linear(x, e8p_decode_triton(codes, x.dtype))


def bench_small_m() -> list[dict]:
    """Decode steps (1 and 16 rows): the fused decode-matmul against decode + F.linear and dense bf16."""
    rows = []
    for out_features, in_features in DECODE_SHAPES:
        codes = random_codes(out_features, in_features)
        dense = torch.randn(out_features, in_features, device=DEV, dtype=torch.bfloat16) * 0.01
        for m in (1, 16):
            x = torch.randn(m, in_features, device=DEV, dtype=torch.bfloat16)
            fused_ms = do_bench_ms(functools.partial(e8p_matmul_triton, x, codes))
            rows.append({"shape": f"{m}x{in_features}->{out_features}", "fused ms": fused_ms,
                         "decode+linear ms": do_bench_ms(functools.partial(decode_then_linear, x, codes)),
                         "dense ms": do_bench_ms(functools.partial(F.linear, x, dense)),
                         "codes GB/s": codes.numel() * 2 / fused_ms / 1e6})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=None, help="JSON file or folder (default: $OUT or .)")
    args = parser.parse_args()
    check_kernels()
    copy = copy_gbps()
    print(f"copy bandwidth: {copy:.0f} GB/s (read + write)")
    decode, transform, layer, small = (
        bench_decode(copy),
        bench_hadamard(copy),
        bench_layer(),
        bench_small_m(),
    )
    print_table(decode + transform, ["op", "shape", "config", "ms", "GB/s", "% copy"])
    print_table(layer, ["shape", "quip# ms", "decode ms", "dense ms", "ratio"])
    print_table(small, ["shape", "fused ms", "decode+linear ms", "dense ms", "codes GB/s"])
    payload = {"environment": environment(), "copy_GBps": copy, "decode": decode, "hadamard": transform,
               "layer_forward": layer, "small_m": small}  # fmt: skip
    print("wrote", write_json("quip_kernels.json", payload, args.out))


if __name__ == "__main__":
    main()
