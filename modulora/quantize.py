"""Quantize a LLaMA-family model decoder layer by decoder layer, holding one layer on the accelerator.

`quantize_(model, config, calibration_ids)`:
1. runs the embeddings on the calibration batch and captures the inputs of decoder layer 0
   (hidden states plus the mask / rotary arguments the model passes to every layer);
2. for each decoder layer: moves it (only it) to the accelerator; for quantizers that need a
   Hessian, collects H = 2·XᵀX/n of each targeted linear's input with forward hooks, in the
   true-sequential order q/k/v → o → gate/up → down, re-running the layer between groups so each
   group sees the outputs of the already-quantized ones (each of those passes stops as soon as
   the group's last linear has its input); swaps in the `QuantizedLinear`s; recomputes the
   layer's outputs *with the quantized layer* as the next layer's inputs; moves it back.

The calibration activations (inputs and outputs of one layer) live on the accelerator too:
n_samples × seq_len × hidden floats each, e.g. 128×512×576×4 B = 151 MB for SmolLM2.

Only the seven projections of each decoder layer are quantized (not embeddings, norms or head).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modulora.models import load_model, save_quantized
from modulora.quant import QuantConfig, QuantizedLinear, get_quantizer
from modulora.targets import ALL_LINEAR

DEFAULT_CALIBRATION = (
    Path(__file__).resolve().parents[2] / "shared" / "datasets" / "c4" / "c4_validation_2k.jsonl"
)
# True-sequential groups: each group's inputs depend only on the groups before it.
SEQUENTIAL_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
MICRO_BATCH = 8
Progress = Callable[[int, int], None]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a LLaMA-family causal LM (`model.model.layers`)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"model: {type(model).__name__} is not a LLaMA-family causal LM (no model.layers)")
    return layers


def linear_targets(layer: nn.Module) -> dict[str, nn.Module]:
    """The seven projections of one decoder layer, {"self_attn.q_proj": module, ...}."""
    return {n: m for n, m in layer.named_modules() if n.rpartition(".")[2] in ALL_LINEAR}


def read_calibration_texts(path: str | os.PathLike[str]) -> list[str]:
    """Texts from .jsonl (field `text`), .json (list of strings or of {"text": ...}) or .txt (whole file)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".json":
        rows = json.loads(path.read_text())
    elif path.suffix == ".txt":
        return [path.read_text()]
    else:
        raise ValueError(f"calibration: {path.name} must be .jsonl, .json or .txt")
    texts = [row if isinstance(row, str) else row.get("text") for row in rows]
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"calibration: every row of {path} needs a string field 'text'")
    return texts


def load_calibration(
    tokenizer: Any,
    path: str | os.PathLike[str] | None = None,
    n_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
) -> torch.Tensor:
    """Token ids [n_samples, seq_len]: random windows of random documents long enough (GPTQ's recipe).

    Documents shorter than `seq_len` are concatenated (EOS-separated) when too few are long enough.
    """
    texts = read_calibration_texts(path or DEFAULT_CALIBRATION)
    rng = random.Random(seed)
    docs = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    long_docs = [d for d in docs if len(d) > seq_len]
    if len(long_docs) < max(1, n_samples // 4):
        stream = [tok for d in docs for tok in [*d, tokenizer.eos_token_id]]
        long_docs = [stream[i : i + 4 * seq_len] for i in range(0, len(stream), 4 * seq_len)]
        long_docs = [d for d in long_docs if len(d) > seq_len]
    if not long_docs:
        raise ValueError(f"calibration: no text of {path or DEFAULT_CALIBRATION} reaches {seq_len} tokens")
    samples = []
    for _ in range(n_samples):
        doc = rng.choice(long_docs)
        start = rng.randrange(0, len(doc) - seq_len)
        samples.append(doc[start : start + seq_len])
    return torch.tensor(samples, dtype=torch.long)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _Captured(Exception):
    """Raised by the catcher to stop the forward pass once layer 0's inputs are recorded."""


@torch.inference_mode()
def _capture_layer0_inputs(
    model: nn.Module, ids: torch.Tensor, device: torch.device
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Hidden states and keyword arguments that layer 0 receives, per micro-batch, on `device`."""
    layers = decoder_layers(model)
    first = layers[0]
    inputs, kwargs_list = [], []

    class Catcher(nn.Module):
        attention_type = getattr(first, "attention_type", None)  # Qwen2 picks the mask by it

        def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            inputs.append(hidden_states)
            kwargs_list.append({k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache")})
            raise _Captured

    # Everything the model runs before layer 0 (embeddings, rotary) visits the device briefly.
    outside = [m for m in model.model.children() if m is not layers]
    homes = [_device_of(m) for m in outside]
    for module in outside:
        module.to(device)
    layers[0] = Catcher()
    try:
        for batch in ids.split(MICRO_BATCH):
            try:
                model(batch.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        layers[0] = first
        for module, home in zip(outside, homes, strict=True):
            module.to(home)
    return inputs, kwargs_list


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), next(iter(module.buffers()), None))
    return tensor.device if tensor is not None else torch.device("cpu")


def _run_layer(
    layer: nn.Module, inputs: list[torch.Tensor], kwargs_list: list[dict[str, Any]]
) -> list[torch.Tensor]:
    outputs = []
    for hidden, kwargs in zip(inputs, kwargs_list, strict=True):
        try:
            out = layer(hidden, **kwargs)
        except _Captured:  # a Hessian hook saw all it needs; the rest of the layer is skipped
            continue
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


@torch.inference_mode()
def _collect_hessians(
    layer: nn.Module, names: list[str], inputs: list[torch.Tensor], kwargs_list: list[dict[str, Any]]
) -> dict[str, torch.Tensor]:
    """H = 2·XᵀX/n [in, in] (float32) of the inputs of each named linear over all micro-batches."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)
    seen: set[str] = set()

    def hook(name: str) -> Callable[..., None]:
        def accumulate(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] += x.shape[0]
            seen.add(name)
            if len(seen) == len(names):  # every linear of the group has its input: stop this batch
                seen.clear()
                raise _Captured

        return accumulate

    handles = [layer.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        _run_layer(layer, inputs, kwargs_list)
    finally:
        for handle in handles:
            handle.remove()
    return {n: 2 * sums[n] / counts[n] for n in names}


def _groups(layer: nn.Module, true_sequential: bool) -> list[list[str]]:
    targets = list(linear_targets(layer))
    if not true_sequential:
        return [targets]
    groups = [[n for n in targets if n.rpartition(".")[2] in group] for group in SEQUENTIAL_GROUPS]
    return [g for g in groups if g]


def _replace(layer: nn.Module, name: str, quantized: QuantizedLinear) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(layer.get_submodule(parent) if parent else layer, leaf, quantized)


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    calibration_ids: torch.Tensor | None = None,
    progress: Progress | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Replace the decoder linears of `model` with quantized layers, in place; returns `model`.

    calibration_ids: token ids [n_samples, seq_len]; required by quantizers with `needs_hessian`.
    progress(done, total) is called after each decoder layer.
    """
    quantizer = get_quantizer(config)
    device = torch.device(device) if device is not None else default_device()
    layers = decoder_layers(model)
    if quantizer.needs_hessian and calibration_ids is None:
        raise ValueError(f"calibration_ids: the {config.method} quantizer needs calibration data")
    inputs, kwargs_list = (
        _capture_layer0_inputs(model, calibration_ids, device) if quantizer.needs_hessian else ([], [])
    )
    for index, layer in enumerate(layers):
        home = _device_of(layer)
        layer.to(device)
        for group in _groups(layer, config.true_sequential):
            hessians = _collect_hessians(layer, group, inputs, kwargs_list) if quantizer.needs_hessian else {}
            for name in group:
                source = layer.get_submodule(name)
                bias = source.bias.detach().float() if source.bias is not None else None
                with torch.no_grad():
                    # An already-quantized base (e.g. a native GGUF) is re-quantized from its materialized W.
                    weight = (
                        source.materialize(torch.float32)
                        if isinstance(source, QuantizedLinear)
                        else source.weight.detach().float()
                    )
                    quantized = quantizer.quantize(weight, bias, hessians.pop(name, None))
                _replace(layer, name, quantized.to(device))
        if quantizer.needs_hessian:
            with torch.inference_mode():
                inputs = _run_layer(layer, inputs, kwargs_list)  # the next layer sees quantized outputs
        layer.to(home)
        if progress is not None:
            progress(index + 1, len(layers))
    return model


def quantize_model(
    ref: str | os.PathLike[str],
    config: QuantConfig,
    out_dir: str | os.PathLike[str],
    progress: Progress | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Load `ref` on the CPU, calibrate, quantize layer by layer, save; returns `out_dir`.

    dtype: of the dense model while it is quantized (bfloat16 halves the CPU memory of a 7B model;
    each weight is still quantized from float32 and Hessians accumulate in float32).
    """
    model, tokenizer = load_model(ref, device="cpu", dtype=dtype)
    quantizer = get_quantizer(config)
    ids = None
    if quantizer.needs_hessian:
        ids = load_calibration(tokenizer, config.calibration, config.n_samples, config.seq_len, config.seed)
    torch.manual_seed(config.seed)
    quantize_(model, config, ids, progress)
    return save_quantized(model, tokenizer, config, out_dir, base=str(ref))
