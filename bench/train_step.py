"""One LoRA training step: ModuLoRA (GPTQ 2/3/4-bit, NF4, QuIP# 2-bit) vs PEFT and Unsloth LoRA/QLoRA.

    python -m bench.train_step [--plan full|7b|graphs|large|2bit|long-7b|long-13b|unsloth|parity|...]
                               [--budget-gib 24] [--methods NAME ...] [--out $OUT/]

Same for every method: random LLaMA-1-shaped weights, LoRA r=16 (alpha 16, dropout 0.05) on all
seven linears, gradient checkpointing (non-reentrant), fused AdamW (lr 1e-4), bf16 autocast,
causal-LM loss on random tokens (ModuLoRA's rows through `modulora.loss` as `modulora.train` runs it,
the peers through the model's own loss). Step time is the mean of 5 steps after 2 warm-up steps; peak
memory is `torch.cuda.max_memory_allocated` over building the adapters and those 7 steps (the
model's packed weights included). Methods ending in "+graphs" replay each step's forward and
backward from a CUDA graph (`modulora.step_graph`, as `modulora.train` does on a GPU). `--plan
parity` also trains a tiny model 20 steps with the Triton kernels (the fused cross-entropy among
them) and with the PyTorch reference (MODULORA_DISABLE_TRITON=1) on the same data and compares the
losses (`parity-e8p`: QuIP# only).
Run it as a module: as a script, bench/ comes first on sys.path and `bench/kernels.py` shadows the
`kernels` package that transformers imports when installed.

`--budget-gib G` gives ModuLoRA's rows a memory budget: they checkpoint only the decoder layers
`modulora.memory.layers_to_checkpoint` says a step needs to fit G GiB, as `modulora.train` does
with a job's GPU budget; each row shows how many (`ckpt_layers`) and the predicted peak beside the
measured one. The peers keep checkpointing every layer, as they ship.

The Unsloth rows (`bench/_unsloth.py`: same random weights, rank, targets and optimizer; dropout 0
and Unsloth's own checkpointing) run after all others, since importing Unsloth patches
transformers; they need its wheels (`python -m bench.unsloth_wheels`) and print why they could not
run in their `error` column.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import environment, print_table, write_json  # noqa: E402
from bench._models import DEVICE, build_model, llama_config  # noqa: E402
from bench._unsloth import remove_saved_models, unsloth_lora_model  # noqa: E402
from modulora.lora import LoraConfig, add_lora_  # noqa: E402
from modulora.loss import token_loss_sum  # noqa: E402
from modulora.memory import ModelShape, layers_to_checkpoint  # noqa: E402
from modulora.step_graph import StepGraphs  # noqa: E402
from modulora.targets import ALL_LINEAR  # noqa: E402
from modulora.train import set_activation_checkpointing  # noqa: E402

GIB = 2**30
METHODS = {  # name -> (build method, bits, adapter library)
    "modulora-2bit": ("gptq", 2, "modulora"),
    "modulora-3bit": ("gptq", 3, "modulora"),
    "modulora-4bit": ("gptq", 4, "modulora"),
    "modulora-nf4": ("nf4", 4, "modulora"),
    "modulora-quip#-2bit": ("e8p", 2, "modulora"),
    "peft-lora-bf16": ("bf16", 16, "peft"),
    "peft-qlora-bnb-nf4": ("bnb-nf4", 4, "peft"),
    "unsloth-lora-bf16": ("bf16", 16, "unsloth"),
    "unsloth-qlora-nf4": ("bnb-nf4", 4, "unsloth"),
}
ALL = [name for name, (_, _, library) in METHODS.items() if library != "unsloth"]
PEERS = ["peft-lora-bf16", "peft-qlora-bnb-nf4", "unsloth-lora-bf16", "unsloth-qlora-nf4"]
# "+graphs": each step's forward and backward replayed from a CUDA graph (`modulora.step_graph`),
# as `modulora.train` runs on a GPU; the optimizer step stays eager.
GRAPHED = [
    "modulora-2bit+graphs",
    "modulora-3bit+graphs",
    "modulora-4bit+graphs",
    "modulora-nf4+graphs",
    "modulora-quip#-2bit+graphs",
]
METHODS |= {name: METHODS[name.removesuffix("+graphs")] for name in GRAPHED}
METHODS["peft-lora-bf16+graphs"] = METHODS["peft-lora-bf16"]  # how much of the gain is the graphs
PLANS = {  # (size, batch, seq, methods)
    "7b": [("7b", 1, 512, ALL), ("7b", 4, 1024, ALL)],
    "large": [
        (
            "13b",
            1,
            128,
            ["modulora-2bit+graphs", "modulora-4bit+graphs", "peft-lora-bf16", "peft-qlora-bnb-nf4"],
        ),
        ("30b", 1, 128, ["modulora-2bit+graphs", "modulora-4bit+graphs", "peft-qlora-bnb-nf4"]),
        ("65b", 1, 128, ["modulora-2bit+graphs", "modulora-quip#-2bit+graphs", "modulora-4bit+graphs"]),
    ],
}
PLANS["full"] = PLANS["7b"] + PLANS["large"]
PLANS["65b"] = PLANS["large"][-1:]
PLANS["2bit"] = [  # QuIP#'s E8P next to GPTQ 2-bit, both graphed, at the 7B and 65B shapes (issue 24)
    ("7b", 1, 512, ["modulora-2bit+graphs", "modulora-quip#-2bit+graphs"]),
    ("65b", 1, 128, ["modulora-2bit+graphs", "modulora-quip#-2bit+graphs"]),
]
PLANS["graphs"] = [  # eager and graphed ModuLoRA beside the peers (issue 3's 7B targets)
    (
        size,
        batch,
        seq,
        ["modulora-4bit", *GRAPHED, "peft-lora-bf16", "peft-qlora-bnb-nf4", "peft-lora-bf16+graphs"],
    )
    for size, batch, seq, _ in PLANS["7b"]
]
# Issue 24's GPU-bound shapes: ModuLoRA graphed (with --budget-gib: its checkpointing budgeted) beside
# PEFT and Unsloth, 4-bit against their 4-bit QLoRA.
LONG = ["modulora-4bit+graphs", "modulora-2bit+graphs", *PEERS]
PLANS["long-7b"] = [("7b", 4, 1024, LONG), ("7b", 1, 4096, LONG)]
PLANS["long-13b"] = [("13b", 4, 1024, LONG), ("13b", 1, 4096, LONG)]
PLANS["unsloth"] = [("7b", 1, 512, ["modulora-4bit+graphs", *PEERS])]
# BENCH_DEVICE=cpu: the code paths, no measurement (the Unsloth row says why it cannot run there)
PLANS["smoke"] = [("tiny", 2, 64, [*ALL[:5], "unsloth-lora-bf16"])]


def add_adapters(
    model: torch.nn.Module, library: str, dropout: float = 0.05, checkpoint_layers: int | None = None
) -> torch.nn.Module:
    set_activation_checkpointing(model, True, checkpoint_layers)
    if library == "modulora":
        add_lora_(model, LoraConfig(r=16, alpha=16, dropout=dropout))
        return model
    import peft

    config = peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules=list(ALL_LINEAR))
    return peft.get_peft_model(model, config)


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own loss, as PEFT's and Unsloth's users train (Unsloth fuses it in its kernels)."""
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def modulora_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean of the loss `modulora.train` sums (chunked LM head; the fused cross-entropy on CUDA)."""
    labels = batch["input_ids"]
    return token_loss_sum(model, {"input_ids": labels, "labels": labels}) / labels[:, 1:].numel()


def train_steps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    steps: int,
    lr: float = 1e-4,
    autocast: bool = True,
    graphs: StepGraphs | None = None,
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor] = causal_lm_loss,
) -> list[float]:
    # Fused on CUDA, as `modulora.train` runs it: the default multi-tensor AdamW allocates a
    # temporary as large as all adapter parameters (about 0.75 GiB at 65B with r=16) at every step.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, fused=DEVICE == "cuda")
    losses = []
    for _ in range(steps):
        if graphs is not None:
            loss = graphs.run({"input_ids": input_ids})
        else:
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
                loss = loss_fn(model, {"input_ids": input_ids})
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=graphs is None)
        losses.append(loss.item())
    return losses


def free() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def allocated_gib(peak: bool = False) -> float:
    if DEVICE != "cuda":
        return float("nan")
    return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / GIB


def checkpointing_for_budget(size: str, batch: int, seq: int, bits: int, budget_gib: float) -> dict:
    """How many decoder layers ModuLoRA checkpoints to fit `budget_gib`, and the predicted peak."""
    shape = ModelShape.from_config(llama_config(size).to_dict())
    layers, estimate = layers_to_checkpoint(
        shape, int(budget_gib * GIB), bits=bits, group_size=128, lora_r=16, seq_len=seq, micro_batch=batch
    )
    return dict(budget_gib=budget_gib, ckpt_layers=layers, predicted_gib=estimate.total / GIB)


def run_one(size: str, batch: int, seq: int, name: str, budget_gib: float | None = None) -> dict:
    build, bits, library = METHODS[name]
    row = dict(model=size, batch=batch, seq=seq, method=name)
    model = graphs = None
    try:
        torch.manual_seed(0)
        if library == "unsloth":
            model = unsloth_lora_model(size, bits, seq)
            free()
            if DEVICE == "cuda":
                torch.cuda.reset_peak_memory_stats()
            row["weights_gib"] = allocated_gib()
        else:
            model = build_model(size, build, bits)
            free()
            if DEVICE == "cuda":
                torch.cuda.reset_peak_memory_stats()
            row["weights_gib"] = allocated_gib()
            layers = None
            if budget_gib is not None and library == "modulora":
                row |= checkpointing_for_budget(size, batch, seq, bits, budget_gib)
                layers = row["ckpt_layers"]
            model = add_adapters(model, library, checkpoint_layers=layers)
        input_ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=DEVICE)
        loss_fn = modulora_loss if library == "modulora" else causal_lm_loss
        if name.endswith("+graphs"):
            params = [p for p in model.parameters() if p.requires_grad]
            graphs = StepGraphs(model, loss_fn, params, autocast_dtype=torch.bfloat16)
        train_steps(model, input_ids, 2, graphs=graphs, loss_fn=loss_fn)  # the first graphed step captures
        start = time.perf_counter()  # train_steps syncs: it reads every loss
        losses = train_steps(model, input_ids, 5, graphs=graphs, loss_fn=loss_fn)
        row["step_s"] = (time.perf_counter() - start) / 5
        row["peak_gib"] = allocated_gib(peak=True)
        row["loss"] = losses[-1]
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as error:  # noqa: BLE001 - the peer could not run here: its row says why
        if library != "unsloth":
            raise
        row["error"] = f"{type(error).__name__}: {error}"
    finally:
        del model, graphs
        free()
    print(row, flush=True)
    return row


def parity_curve(
    build: str, bits: int, variant: str, steps: int, dtype: torch.dtype, autocast: bool
) -> list[float]:
    """Losses of `steps` LoRA steps on the parity model with the PyTorch references ("reference"),
    the Triton kernels ("triton"), every GPTQ matmul through the fused kernel ("triton-fused") or
    the kernels under CUDA-graph steps ("triton-graphs")."""
    from gpu_kernels.gptq_matmul import gptq_matmul_triton
    from modulora.quant.gptq_packed import GPTQLinear

    def fused_matmul(self: GPTQLinear, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        args = (self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.zero_offset, transpose)
        return gptq_matmul_triton(x, *args)

    os.environ["MODULORA_DISABLE_TRITON"] = "1" if variant == "reference" else "0"
    patched = {}
    if variant == "triton-fused":  # every matmul through the fused kernel, whatever the rows
        patched = {"matmul": GPTQLinear.matmul, "matmul_t": GPTQLinear.matmul_t}
        GPTQLinear.matmul = lambda self, x: fused_matmul(self, x)
        GPTQLinear.matmul_t = lambda self, g: fused_matmul(self, g, transpose=True)
    try:
        torch.manual_seed(0)
        model = add_adapters(
            build_model("micro" if DEVICE == "cpu" else "tiny", build, bits, dtype), "modulora"
        )
        data = torch.randint(0, 1000, (4, 128), generator=torch.Generator().manual_seed(1)).to(DEVICE)
        graphs = None
        if variant == "triton-graphs":
            params = [p for p in model.parameters() if p.requires_grad]
            graphs = StepGraphs(model, modulora_loss, params, torch.bfloat16 if autocast else None)
        return train_steps(
            model, data, steps, lr=1e-3, autocast=autocast, graphs=graphs, loss_fn=modulora_loss
        )
    finally:
        os.environ.pop("MODULORA_DISABLE_TRITON")
        for key, value in patched.items():
            setattr(GPTQLinear, key, value)


def loss_parity(steps: int = 20, formats: tuple[str, ...] = ("gptq", "e8p")) -> list[dict]:
    """Losses of a tiny ModuLoRA model: Triton kernels vs the PyTorch reference, same data and init.

    On CUDA: the "tiny" model (MLP width 688 = 344·2: QuIP#'s largest Paley factor) in bf16
    autocast, and QuIP# also in float32 (where the transforms must agree to fp32 rounding) and with
    graphed steps. With BENCH_DEVICE=cpu TRITON_INTERPRET=1 the kernels run in Triton's interpreter:
    a "micro" model in float32 (the interpreter computes bf16 dots wrongly).
    """
    on_cpu = DEVICE == "cpu"
    if on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("BENCH_DEVICE=cpu: parity needs TRITON_INTERPRET=1 to run the kernels")
    # On CPU: no bf16 in the interpreter, no graphs without CUDA.
    dtype = torch.float32 if on_cpu else torch.bfloat16
    runs = [("gptq", bits, ["triton", "triton-fused"], dtype) for bits in (2, 3, 4)]
    runs.append(("e8p", 2, ["triton"] if on_cpu else ["triton", "triton-graphs"], dtype))
    if not on_cpu:
        runs.append(("e8p", 2, ["triton", "triton-graphs"], torch.float32))
    results = []
    for build, bits, variants, dtype in (run for run in runs if run[0] in formats):
        autocast = dtype == torch.bfloat16
        ref = parity_curve(build, bits, "reference", steps, dtype, autocast)
        for variant in variants:
            curve = parity_curve(build, bits, variant, steps, dtype, autocast)
            diff = max(abs(a - b) for a, b in zip(curve, ref, strict=True))
            name = str(dtype).removeprefix("torch.")
            row = dict(format=build, bits=bits, dtype=name, variant=variant, max_abs_loss_diff=diff,
                       first=ref[0], last=ref[-1], last_variant=curve[-1])  # fmt: skip
            print(row, flush=True)
            results.append(dict(row, losses=curve, reference=ref))
    return results


def profile_step(size: str = "7b", batch: int = 1, seq: int = 512, name: str = "modulora-4bit") -> str:
    """The top operators of one training step by self CPU time and by device time (after 2 warm-ups)."""
    build, bits, library = METHODS[name]
    model = add_adapters(build_model(size, build, bits), library)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=DEVICE)
    train_steps(model, input_ids, 2)
    with torch.profiler.profile() as prof:
        train_steps(model, input_ids, 1)
    averages = prof.key_averages()
    return "\n".join(
        [
            averages.table(sort_by="self_cpu_time_total", row_limit=15),
            averages.table(sort_by="self_device_time_total", row_limit=12),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default="full", choices=[*PLANS, "parity", "parity-e8p", "profile"])
    parser.add_argument("--out", help="JSON file or folder (default: $OUT or the current folder)")
    parser.add_argument(
        "--budget-gib", type=float, help="ModuLoRA rows checkpoint only the layers this budget needs"
    )
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="only these of the plan's rows")
    args = parser.parse_args()
    payload: dict = dict(environment=environment(), plan=args.plan, budget_gib=args.budget_gib)
    if args.plan == "profile":
        payload["profile"] = profile_step()
        print(payload["profile"])
    elif args.plan.startswith("parity"):
        payload["parity"] = loss_parity(formats=("e8p",) if args.plan == "parity-e8p" else ("gptq", "e8p"))
        print_table(
            payload["parity"],
            ["format", "bits", "dtype", "variant", "max_abs_loss_diff", "first", "last", "last_variant"],
        )
    else:
        runs = [
            (size, b, s, m)
            for size, b, s, methods in PLANS[args.plan]
            for m in methods
            if args.methods is None or m in args.methods
        ]
        # Importing Unsloth patches transformers: its rows come after every other one.
        runs.sort(key=lambda run: METHODS[run[3]][2] == "unsloth")
        rows = [run_one(*run, budget_gib=args.budget_gib) for run in runs]
        remove_saved_models()
        payload["rows"] = rows
        columns = ["model", "batch", "seq", "method", "step_s", "peak_gib", "weights_gib", "loss"]
        print_table(rows, [*columns, "ckpt_layers", "predicted_gib", "error"])
    print(f"wrote {write_json(f'train_step_{args.plan}.json', payload, args.out)}")


if __name__ == "__main__":
    main()
