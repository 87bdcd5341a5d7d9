"""Decode throughput of the inference engine vs Hugging Face `generate` (bf16 and bitsandbytes NF4).

    python -m bench.decode                      # on a GPU: LLaMA-7B shape, all measurements
    BENCH_DEVICE=cpu python -m bench.decode --size tiny --batches 1 2 --prompt 32 --new 8 --parts ours-quip

What runs, in one process, for a LLaMA-7B-shaped model with random weights (no checkpoint needed):
- ours, GPTQ 4-bit and 2-bit (group 128) and QuIP# 2-bit (E8P, "ours-quip"), through
  `modulora.serve.decoder.Decoder`, the engine's
  model path: each prompt prefilled into its own KV cache row, then decode steps over all rows
  (fused low-bit matmul, CUDA graphs), greedy. Tokens/s = batch x new tokens / wall time of the
  whole generation (prefills included); time to first token = prefill of one 512-token prompt.
- peers: `model.generate` of transformers, bf16 weights and bitsandbytes NF4 (double-quantized),
  same prompts, `min_new_tokens` = `max_new_tokens` so every row produces all its tokens.
- adapters: 8 rank-16 LoRA adapters (all seven linears) in one batch of 8 vs 8 rows on one adapter.
- each decode matmul alone (batch 1, packed weights rotated so reads come from HBM): achieved
  bandwidth and its share of the copy bandwidth measured in the same run.
Not included: the engine's detokenization and scheduling in Python (per step, per row).
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any

import torch

from bench._common import (
    copies_for,
    do_bench_ms,
    environment,
    graph_bench_ms,
    print_table,
    random_gptq_buffers,
    write_json,
)
from bench._models import DEVICE, LLAMA_SIZES, build_model
from gpu_kernels.gptq_matmul import gptq_matmul
from modulora.serve.decoder import Decoder

PARTS = ("ours-4bit", "ours-2bit", "ours-quip", "hf-bf16", "hf-bnb-nf4", "matmuls", "profile")


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def free(*objects: Any) -> None:
    del objects
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def prompts(batch: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(
        3, vocab, (batch, length), generator=torch.Generator().manual_seed(batch), device="cpu"
    )


def ours_generate(decoder: Decoder, ids: torch.Tensor, new: int, slots: list[int]) -> tuple[float, float]:
    """(seconds for the whole generation, seconds to the first token of the first request)."""
    batch, length = ids.shape
    sync()
    started = time.perf_counter()
    first = []
    for row in range(batch):
        logits = decoder.forward(ids[row : row + 1].to(DEVICE), [row], [0], [slots[row]])
        first.append(logits.argmax(-1))
        if row == 0:
            sync()
            ttft = time.perf_counter() - started
    tokens = torch.cat(first)[:, None]
    rows = list(range(batch))
    for step in range(new - 1):
        tokens = decoder.forward(tokens, rows, [length + step] * batch, slots).argmax(-1)[:, None]
    sync()
    return time.perf_counter() - started, ttft


def _record(results: list[dict], row: dict) -> None:
    results.append(row)
    print(row, flush=True)  # partial results survive a run cut short


def hf_generate(model: torch.nn.Module, ids: torch.Tensor, new: int) -> float:
    ids = ids.to(DEVICE)
    sync()
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, use_cache=True, pad_token_id=0)  # fmt: skip
    sync()
    assert out.shape[1] == ids.shape[1] + new
    return time.perf_counter() - started


def load_adapters(decoder: Decoder, count: int, rank: int) -> None:
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    for layer in decoder.lora_layers.values():
        layer.resize_(count + 1, rank)
        for slot in range(1, count + 1):
            a = torch.randn(rank, layer.in_features, generator=generator, device=DEVICE) * 0.01
            b = torch.randn(layer.out_features, rank, generator=generator, device=DEVICE) * 0.01
            layer.load_slot_(slot, a, b, scaling=2.0)
    decoder.invalidate_graphs()


def check_graph_step(decoder: Decoder, vocab: int) -> dict[str, float]:
    """The same decode step eager and as a graph replay (same cache state): logits must agree."""
    ids = prompts(1, 32, vocab).to(DEVICE)
    token = decoder.forward(ids, [0], [0], [0]).argmax(-1)[:, None]
    decoder.use_graphs = False
    eager = decoder.forward(token, [0], [32], [0])
    decoder.use_graphs = DEVICE == "cuda"
    replayed = decoder.forward(token, [0], [32], [0])
    check = dict(
        max_abs_diff=float((eager - replayed).abs().max()),
        same_argmax=bool(eager.argmax() == replayed.argmax()),
    )
    print("graph vs eager decode step:", check, flush=True)
    return check


def profile_decode_step(decoder: Decoder, vocab: int, steps: int = 5) -> dict[str, Any]:
    """Where a batch-1 decode step goes on the device: the kernels of replayed step graphs, by total
    time, and their sum against the steps' wall time. Kernels launched as programmatic dependents
    (Hopper) start before the previous one ends, so their times include that wait and the sum can
    exceed the wall time; `MODULORA_DISABLE_PDL=1` gives the kernels' own times and the gaps."""
    ids = prompts(1, 32, vocab).to(DEVICE)
    token = decoder.forward(ids, [0], [0], [0]).argmax(-1)[:, None]
    decoder.forward(token, [0], [32], [0])  # captures the step graph
    sync()
    activity = torch.profiler.ProfilerActivity
    with torch.profiler.profile(activities=[activity.CUDA if DEVICE == "cuda" else activity.CPU]) as prof:
        started = time.perf_counter()
        for step in range(steps):
            decoder.forward(token, [0], [33 + step], [0])
        sync()
        wall_ms = 1000 * (time.perf_counter() - started) / steps
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1000 / steps
    table = prof.key_averages().table(sort_by=f"{DEVICE}_time_total", row_limit=25, max_name_column_width=60)
    summary = dict(step_wall_ms=wall_ms, kernel_ms_per_step=kernel_ms, kernels_per_step=len(kernels) / steps)
    print(f"kernels of {steps} batch-1 decode steps (graph replays): {summary}\n{table}")
    return dict(summary, table=table)


def measure_ours(
    args: argparse.Namespace,
    bits: int,
    results: list[dict],
    profiles: dict[str, dict[str, Any]],
    method: str = "gptq",
) -> dict[str, float]:
    """GPTQ ("gptq") or QuIP# ("e8p", 2-bit) through the decoder; adapters measured on GPTQ 4-bit."""
    model = build_model(args.size, method, bits)
    system = f"ours gptq {bits}-bit" if method == "gptq" else "ours quip# 2-bit"
    vocab = model.config.vocab_size
    decoder = Decoder(model, rows=max(*args.batches, 8), max_seq_len=args.prompt + args.new)
    check_graph_step(decoder, vocab)
    if "profile" in args.parts:
        profiles[f"{bits}-bit" if method == "gptq" else "quip# 2-bit"] = profile_decode_step(decoder, vocab)
    for batch in args.batches:
        ours_generate(decoder, prompts(batch, args.prompt, vocab), 4, [0] * batch)  # capture graphs, warm up
        seconds, ttft = ours_generate(decoder, prompts(batch, args.prompt, vocab), args.new, [0] * batch)
        _record(results, dict(system=system, batch=batch, tok_s=batch * args.new / seconds,
                            ttft_ms=1000 * ttft, seconds=seconds))  # fmt: skip
    adapters = {}
    if method == "gptq" and bits == 4:
        load_adapters(decoder, 8, 16)
        ids = prompts(8, args.prompt, vocab)
        for name, slots in [("8 rows, 1 adapter", [1] * 8), ("8 rows, 8 adapters", list(range(1, 9)))]:
            ours_generate(decoder, ids, 4, slots)
            adapters[name] = ours_generate(decoder, ids, args.new, slots)[0]
        adapters["ratio"] = adapters["8 rows, 8 adapters"] / adapters["8 rows, 1 adapter"]
        print("adapters (seconds):", adapters, flush=True)
    free(decoder, model)
    return adapters


def measure_hf(args: argparse.Namespace, method: str, results: list[dict]) -> None:
    model = build_model(args.size, method).eval()
    vocab = model.config.vocab_size
    for batch in args.batches:
        hf_generate(model, prompts(batch, args.prompt, vocab), 2)  # warm up
        ttft = hf_generate(model, prompts(batch, args.prompt, vocab), 1)
        seconds = hf_generate(model, prompts(batch, args.prompt, vocab), args.new)
        _record(results, dict(system=f"hf generate {method}", batch=batch, tok_s=batch * args.new / seconds,
                            ttft_ms=1000 * ttft, seconds=seconds))  # fmt: skip
    free(model)


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy (read + write), the practical HBM ceiling."""
    src = torch.empty(2**30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (do_bench_ms(lambda: dst.copy_(src)) / 1000)


def measure_matmuls(args: argparse.Namespace, bits: int, ceiling: float) -> list[dict]:
    hidden, inter, _, _ = LLAMA_SIZES[args.size]
    shapes = {  # the fused products are what the decoder runs on a GPU (modulora.serve.decoder)
        "q/k/v/o_proj": (hidden, hidden),
        "gate/up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
        "fused qkv": (hidden, 3 * hidden),
        "fused gate+up": (hidden, 2 * inter),
    }
    rows = []
    for name, (k, n) in shapes.items():
        first = random_gptq_buffers(k, n, bits, 128, DEVICE)
        nbytes = sum(first[key].nbytes for key in ("qweight", "qzeros", "scales"))  # g_idx is not read
        weights = [first] + [
            random_gptq_buffers(k, n, bits, 128, DEVICE) for _ in range(copies_for(nbytes) - 1)
        ]
        x = torch.randn(1, k, dtype=torch.bfloat16, device=DEVICE)
        # Device time from CUDA-graph replays, as decode steps run: eagerly, a call of a few
        # microseconds measures its launch.
        ms = graph_bench_ms(
            lambda w, x=x: gptq_matmul(x, w["qweight"], w["qzeros"], w["scales"], w["g_idx"], bits),
            [(w,) for w in weights],
        )
        moved = nbytes + 2 * (k + n)  # packed weight + bf16 x and y
        rows.append(dict(bits=bits, matmul=name, shape=f"1x{k} @ {k}x{n}", us=1000 * ms,
                         gb_s=moved / ms / 1e6, share_of_copy_bw=moved / (ms / 1000) / ceiling))  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="7b", choices=sorted(LLAMA_SIZES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="what to measure")
    parser.add_argument("--out", default=None, help="JSON file or folder (default: $OUT or .)")
    args = parser.parse_args()
    torch.manual_seed(0)

    results: list[dict] = []
    profiles: dict[str, dict[str, Any]] = {}
    adapters = measure_ours(args, 4, results, profiles) if "ours-4bit" in args.parts else {}
    if "ours-2bit" in args.parts:
        measure_ours(args, 2, results, profiles)
    if "ours-quip" in args.parts:
        measure_ours(args, 2, results, profiles, method="e8p")
    for method in ("bf16", "bnb-nf4"):
        if f"hf-{method}" in args.parts:
            measure_hf(args, method, results)
    print_table(results, ["system", "batch", "tok_s", "ttft_ms", "seconds"])

    matmuls: list[dict] = []
    ceiling = float("nan")
    if DEVICE == "cuda" and "matmuls" in args.parts:
        ceiling = copy_bandwidth()
        matmuls = [row for bits in (4, 2) for row in measure_matmuls(args, bits, ceiling)]
        print(f"copy bandwidth: {ceiling / 1e9:.0f} GB/s")
        print_table(matmuls, ["bits", "matmul", "shape", "us", "gb_s", "share_of_copy_bw"])
    payload = dict(args=vars(args), environment=environment(), generation=results, adapters=adapters,
                   copy_bandwidth_gb_s=ceiling / 1e9, matmuls=matmuls, profiles=profiles)  # fmt: skip
    print("wrote", write_json("decode.json", payload, args.out))


if __name__ == "__main__":
    main()
