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

`quantize_model(ref, config, out_dir)` streams the same steps from disk: the model is a skeleton on
the meta device, each decoder layer's tensors are read from the safetensors shards only when that
layer is quantized, go straight to the accelerator, and the quantized layer is written out as a
shard and dropped (`StreamedLayers`), so host memory holds about one layer, not the model. With the
same dtype the result is bit-identical to `quantize_` on the model loaded whole.

Only the seven projections of each decoder layer are quantized (not embeddings, norms or head).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modulora.models import (
    is_quantized_dir,
    load_model,
    load_tokenizer,
    resolve_model,
    save_quantized,
    write_quantized_metadata,
)
from modulora.quant import QuantConfig, QuantizedLinear, get_quantizer
from modulora.targets import ALL_LINEAR
from modulora.weights import SafetensorsSource, ShardWriter, tied_aliases

# 512 C4 documents shipped in the package (ODC-BY; calibration/ATTRIBUTION.md).
DEFAULT_CALIBRATION = Path(__file__).resolve().parent / "calibration" / "c4_sample.jsonl.gz"
# Calibration windows (count, tokens) when the config leaves them unset, by the device that runs the
# layers: GPTQ's 128 × 512 on a GPU; on a CPU a 16th of the tokens, which keeps quantizing SmolLM2
# to about a minute on two cores (the full set takes 15–30 minutes there).
CALIBRATION_SIZES = {"cuda": (128, 512), "cpu": (16, 256)}
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


def read_calibration_texts(path: str | os.PathLike[str], tokenizer: Any = None) -> list[str]:
    """The texts in a calibration file.

    .txt: the whole file; .jsonl.gz: the field `text` of every line (the shipped C4 sample); any
    other file is read as training rows (`modulora.data.read_rows`: .jsonl/.json/.csv, or a stored
    upload without a suffix): a row's `text` as it is, or a chat / alpaca / prompt-completion row as
    training renders it (its chat template needs `tokenizer`).
    """
    from modulora.data import DataError, detect_format, read_rows, render

    path = Path(path)
    if path.suffix == ".txt":
        return [path.read_text()]
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return [row["text"] for row in rows]
    texts = []
    try:
        for row in read_rows(path):
            fmt = detect_format(row)
            text = row.data["text"] if fmt == "text" else render(row.data, fmt, tokenizer, row.line)[0]
            if not isinstance(text, str):
                raise DataError(row.line, "text", "must be a string")
            texts.append(text)
    except DataError as e:
        raise ValueError(
            f"calibration: {path.name}: {e} (rows need a string field 'text' or a training format)"
        ) from e
    if not texts:
        raise ValueError(f"calibration: {path} has no rows with a string field 'text'")
    return texts


def calibration_size(config: QuantConfig, device: torch.device) -> tuple[int, int]:
    """(n_samples, seq_len) of `config`, each one left unset taken from `CALIBRATION_SIZES` for `device`."""
    n_samples, seq_len = CALIBRATION_SIZES["cuda" if device.type == "cuda" else "cpu"]
    return config.n_samples or n_samples, config.seq_len or seq_len


def load_calibration(
    tokenizer: Any,
    path: str | os.PathLike[str] | None = None,
    n_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
) -> torch.Tensor:
    """Token ids [n_samples, seq_len]: random windows of random documents long enough (GPTQ's recipe).

    path: a calibration file (`read_calibration_texts`); None = the shipped C4 sample. Documents
    shorter than `seq_len` are concatenated (EOS-separated) when too few are long enough.
    """
    texts = read_calibration_texts(path or DEFAULT_CALIBRATION, tokenizer)
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


class InMemoryLayers:
    """Layers of a model already in memory: each visits the device while it is quantized."""

    def __init__(self) -> None:
        self.homes: dict[int, torch.device] = {}

    def prepare_embeddings(self, model: nn.Module) -> None:
        """Nothing to read: the embeddings are loaded."""

    def release_embeddings(self, model: nn.Module) -> None:
        """Nothing to drop: the model stays whole."""

    def load(self, index: int, layer: nn.Module, device: torch.device) -> None:
        self.homes[index] = _device_of(layer)
        layer.to(device)

    def release(self, index: int, layer: nn.Module) -> None:
        layer.to(self.homes.pop(index))


class StreamedLayers:
    """Layers of a meta-device skeleton read from a checkpoint when needed and written out when done.

    `load` reads one decoder layer's tensors from `source` onto the device, cast to `dtype` (as
    `from_pretrained(dtype=...)` casts them); `release` writes the quantized layer as one shard
    and turns it back into meta tensors, so host memory never holds more than one layer.
    """

    def __init__(self, source: SafetensorsSource, writer: ShardWriter, dtype: torch.dtype) -> None:
        self.source, self.writer, self.dtype = source, writer, dtype

    def _read_into(self, module: nn.Module, prefix: str, device: torch.device | str) -> None:
        names = list(module.state_dict())
        tensors = self.source.get_many([f"{prefix}{n}" for n in names], device)
        state = {n: _cast(tensors[f"{prefix}{n}"], self.dtype) for n in names}
        module.load_state_dict(state, assign=True)

    def prepare_embeddings(self, model: nn.Module) -> None:
        """What runs before layer 0 (embeddings; the final norm, moved along with them), on the CPU."""
        for name, module in _outside_layers(model):
            self._read_into(module, f"model.{name}.", "cpu")

    def release_embeddings(self, model: nn.Module) -> None:
        for _, module in _outside_layers(model):
            module.to("meta")

    def load(self, index: int, layer: nn.Module, device: torch.device) -> None:
        self._read_into(layer, f"model.layers.{index}.", device)

    def release(self, index: int, layer: nn.Module) -> None:
        self.writer.write({f"model.layers.{index}.{k}": v for k, v in layer.state_dict().items()})
        layer.to("meta")


LayerStore = InMemoryLayers | StreamedLayers


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _outside_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The inner model's children other than the decoder layers that hold weights (embeddings, norm)."""
    layers = decoder_layers(model)
    return [
        (name, module)
        for name, module in model.model.named_children()
        if module is not layers and any(True for _ in module.parameters())
    ]


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    calibration_ids: torch.Tensor | None = None,
    progress: Progress | None = None,
    device: str | torch.device | None = None,
    layers_store: LayerStore | None = None,
) -> nn.Module:
    """Replace the decoder linears of `model` with quantized layers, in place; returns `model`.

    calibration_ids: token ids [n_samples, seq_len]; required by quantizers with `needs_hessian`.
    progress(done, total) is called after each decoder layer.
    layers_store: where each layer's weights come from and go to; default: `model` is in memory.
    """
    quantizer = get_quantizer(config)
    device = torch.device(device) if device is not None else default_device()
    store = layers_store or InMemoryLayers()
    layers = decoder_layers(model)
    if quantizer.needs_hessian and calibration_ids is None:
        raise ValueError(f"calibration_ids: the {config.method} quantizer needs calibration data")
    inputs: list[torch.Tensor] = []
    kwargs_list: list[dict[str, Any]] = []
    if quantizer.needs_hessian:
        store.prepare_embeddings(model)
        inputs, kwargs_list = _capture_layer0_inputs(model, calibration_ids, device)
        store.release_embeddings(model)
    for index, layer in enumerate(layers):
        store.load(index, layer, device)
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
        store.release(index, layer)
        if progress is not None:
            progress(index + 1, len(layers))
    return model


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a GPU; float32 on a CPU, where bfloat16 matmuls are emulated and several times slower."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def quantize_model(
    ref: str | os.PathLike[str],
    config: QuantConfig,
    out_dir: str | os.PathLike[str],
    progress: Progress | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Path:
    """Quantize `ref` layer by layer, streaming its layers from disk, and save it; returns `out_dir`.

    dtype: of the dense layers while they are quantized and of the saved embeddings, norms and head
    (default `default_dtype(device)`); each weight is still quantized from float32 and Hessians
    accumulate in float32. Calibration: `config.calibration` or the shipped C4 sample, sized by
    `calibration_size`. An already-quantized `ref` (a native GGUF base) is re-quantized in memory.
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    folder = resolve_model(ref)
    quantizer = get_quantizer(config)
    tokenizer = load_tokenizer(folder)
    ids = None
    if quantizer.needs_hessian:
        n_samples, seq_len = calibration_size(config, device)
        config = dataclasses.replace(config, n_samples=n_samples, seq_len=seq_len)  # recorded as used
        ids = load_calibration(tokenizer, config.calibration, n_samples, seq_len, config.seed)
    torch.manual_seed(config.seed)
    if is_quantized_dir(folder):
        model, _ = load_model(folder, device="cpu", dtype=dtype)
        quantize_(model, config, ids, progress, device)
        return save_quantized(model, tokenizer, config, out_dir, base=str(ref))

    model = _skeleton(folder, dtype)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    source, writer = SafetensorsSource(folder, tied_aliases(model.config)), ShardWriter(tmp)
    quantize_(model, config, ids, progress, device, StreamedLayers(source, writer, dtype))
    layer_prefix = "model.layers."
    for key in model.state_dict():  # embeddings, final norm and head: one tensor at a time
        if not key.startswith(layer_prefix) and not _is_tied_head(model, key):
            writer.write({key: _cast(source.get(key), dtype)})
    writer.close()
    return write_quantized_metadata(model, tokenizer, config, tmp, out_dir, base=str(ref))


def _skeleton(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The model of `folder`'s config.json with every parameter on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):  # rotary buffers real: computed, not loaded
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _is_tied_head(model: nn.Module, key: str) -> bool:
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))
