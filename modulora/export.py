"""Adapters on disk in PEFT's format, plus a manifest that says exactly what they were trained on.

    export_adapter(model, "out/adapter", base_model="smollm2-135m-instruct", quant_config=qc,
                   lora_config=lc, train_config=tc, dataset_sha256=sha, tokenizer=tokenizer)

writes `adapter_config.json` + `adapter_model.safetensors` (keys `base_model.model.<module>.lora_A.weight`,
as `peft` saves them), `manifest.json` and the tokenizer (with its chat template). `peft` loads the
folder onto the dequantized base (`dequantize_model`); `load_adapter` loads it onto our quantized base.

For other stacks: `export_merged` writes a dense bf16 Hugging Face folder (base dequantized, adapter
merged) that plain transformers, vLLM or any converter loads; `export_gguf_lora` writes the adapter
as llama.cpp's LoRA GGUF (what its `convert_lora_to_gguf.py` writes) for a GGUF base.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from modulora.lora import LoraConfig, LoraLinear, add_lora_, lora_layers
from modulora.quant import QuantConfig, QuantizedLinear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST = "manifest.json"
PEFT_PREFIX = "base_model.model."
MANIFEST_VERSION = 1


def _as_dict(config: Any) -> dict[str, Any] | None:
    if config is None or isinstance(config, dict):
        return config
    return config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("modulora", "torch", "transformers", "peft", "safetensors"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def peft_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter weights under PEFT's saved names: `base_model.model.<module>.lora_{A,B}.weight`."""
    state = {}
    for name, layer in lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            weight = getattr(layer, part)[adapter_name].weight
            state[f"{PEFT_PREFIX}{name}.{part}.weight"] = weight.detach().cpu().contiguous()
    if not state:
        raise ValueError("model: has no LoRA layers (run modulora.lora.add_lora_ first)")
    return state


def peft_adapter_config(lora_config: LoraConfig, base_model: str) -> dict[str, Any]:
    """PEFT's `adapter_config.json`, produced by the installed `peft` so it always loads there."""
    import peft

    config = peft.LoraConfig(
        r=lora_config.r,
        lora_alpha=lora_config.alpha,
        lora_dropout=lora_config.dropout,
        target_modules=list(lora_config.targets),
        use_rslora=lora_config.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
        inference_mode=True,
    )
    return json.loads(
        json.dumps(config.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v))
    )


def export_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    base_model: str,
    quant_config: QuantConfig | dict[str, Any] | None,
    lora_config: LoraConfig,
    train_config: Any = None,
    dataset_sha256: str | None = None,
    tokenizer: Any = None,
    metrics: dict[str, Any] | None = None,
    adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the adapter folder atomically (temporary folder, then rename); returns `out_dir`.

    base_model: the exact base the adapter was trained on (a built-in name, or the quantized base's
    folder), recorded in the manifest. base_model_name_or_path: what PEFT's config names, a folder
    or hub name transformers loads (`AutoPeftModelForCausalLM` reads it); defaults to `base_model`.
    metrics: optional final numbers (train/validation loss, accuracy) for the manifest.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = peft_state_dict(model, adapter_name)
    save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    peft_config = peft_adapter_config(lora_config, base_model_name_or_path or base_model)
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2))
    manifest = {
        "version": MANIFEST_VERSION,
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "base_model": base_model,
        "quantization": _as_dict(quant_config),
        "lora": _as_dict(lora_config),
        "training": _as_dict(train_config),
        "dataset_sha256": dataset_sha256,
        "metrics": metrics,
        "adapter": {"tensors": len(state), "parameters": sum(t.numel() for t in state.values())},
        "libraries": library_versions(),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def read_manifest(adapter_dir: str | os.PathLike[str]) -> dict[str, Any]:
    return json.loads((Path(adapter_dir) / MANIFEST).read_text())


def load_adapter(
    model: nn.Module, adapter_dir: str | os.PathLike[str], adapter_name: str = "default"
) -> nn.Module:
    """Wrap `model`'s target layers in LoRA (unless already wrapped) and load a PEFT adapter folder."""
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter: peft_type {config['peft_type']!r} is not supported, only 'LORA'")
    lora_config = LoraConfig(
        r=config["r"],
        alpha=config["lora_alpha"],
        dropout=config.get("lora_dropout", 0.0),
        target_modules=list(config["target_modules"]),
        use_rslora=config.get("use_rslora", False),
    )
    if not lora_layers(model):
        add_lora_(model, lora_config, adapter_name)
    layers = lora_layers(model)
    weights = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    expected = {f"{PEFT_PREFIX}{name}.{part}.weight" for name in layers for part in ("lora_A", "lora_B")}
    if set(weights) != expected:
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(
            f"adapter: keys do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    with torch.no_grad():
        for name, layer in layers.items():
            for part in ("lora_A", "lora_B"):
                target = getattr(layer, part)[adapter_name].weight
                target.copy_(weights[f"{PEFT_PREFIX}{name}.{part}.weight"].to(target.dtype))
            layer.scaling[adapter_name] = lora_config.scaling
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every `QuantizedLinear` by an `nn.Linear` holding its materialized weight, in place."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, QuantizedLinear):
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if isinstance(parent, LoraLinear):
            raise ValueError("model: dequantize the base before adding LoRA")
        weight = module.materialize(dtype)
        dense = nn.Linear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device=weight.device,
            dtype=dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(weight)
            if module.bias is not None:
                dense.bias.copy_(module.bias)
        dense.requires_grad_(False)
        setattr(parent, leaf, dense)
    return model


# ---------------------------------------------------------------------------------------------- other stacks


def merge_lora_(
    model: nn.Module, dtype: torch.dtype = torch.bfloat16, adapter_name: str = "default"
) -> nn.Module:
    """Replace every `LoraLinear` by an `nn.Linear` holding base + B·A·scaling, and every remaining
    `QuantizedLinear` by its dense weight; then cast the whole model to `dtype`. In place.

    Each sum is formed in float32 and rounded once, so the merged weight is the adapter's function up
    to one rounding to `dtype`; one layer at a time is in float32, so a merge needs the dense model
    in `dtype` plus one float32 layer.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLinear):
            base = module.base_layer
            dense = (
                base.materialize(torch.float32) if isinstance(base, QuantizedLinear) else base.weight.float()
            )
            weight = dense + module.delta_weight(adapter_name).to(dense.device)
        elif isinstance(module, QuantizedLinear) and not name.endswith(".base_layer"):
            base, weight = module, module.materialize(torch.float32)
        else:
            continue
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, dtype=dtype)
        with torch.no_grad():
            merged.weight.copy_(weight)
            if base.bias is not None:
                merged.bias.copy_(base.bias)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, merged.to(weight.device))
    model.to(dtype)
    model.requires_grad_(False)
    return model


def export_merged(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    tokenizer: Any = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """A dense Hugging Face folder (config.json, safetensors, tokenizer) of the model with its adapter
    merged and its base dequantized, for any serving stack: `AutoModelForCausalLM.from_pretrained`
    loads it with no ModuLoRA code. Written atomically; `model` is merged in place."""
    out_dir = Path(out_dir)
    merge_lora_(model, dtype)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the weights are dense now
    model.config.dtype = dtype
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


# llama.cpp's names of the decoder linears (its LLaMA tensor map).
LLAMA_CPP_LINEARS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}  # fmt: skip


def _llama_cpp_rotary_rows(rows: int, heads: int) -> torch.Tensor:
    """Row order of llama.cpp's q/k layout from Hugging Face's (its converter's `permute`): the two
    rotary halves of every head interleaved. Reading row r from order[r] converts."""
    dim = rows // heads // 2
    return torch.arange(rows).view(heads, 2, dim).transpose(1, 2).reshape(rows)


def export_gguf_lora(
    adapter_dir: str | os.PathLike[str], base_config: dict[str, Any], out_path: str | os.PathLike[str]
) -> Path:
    """The adapter as llama.cpp's LoRA GGUF, as its `convert_lora_to_gguf.py` writes it: metadata
    `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, and per adapted linear
    `blk.<i>.<name>.weight.lora_a` (A, [r, in]) and `.lora_b` (B, [out, r]) in float32, B's rows of
    q and k in llama.cpp's rotary order. base_config: the base's config.json (heads, architecture).

    llama.cpp scales by alpha / r; an rsLoRA adapter (alpha / sqrt(r)) is written with alpha·sqrt(r).
    """
    import gguf

    adapter_dir, out_path = Path(adapter_dir), Path(out_path)
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    weights = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    if base_config.get("model_type") not in ("llama", "mistral"):
        raise ValueError(
            f"base: llama.cpp LoRA export supports LLaMA-layout models, not {base_config.get('model_type')!r}"
        )
    alpha = float(config["lora_alpha"]) * (math.sqrt(config["r"]) if config.get("use_rslora") else 1.0)
    heads = {
        "attn_q": base_config["num_attention_heads"],
        "attn_k": base_config.get("num_key_value_heads", base_config["num_attention_heads"]),
    }

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for key in sorted(k for k in weights if k.endswith(".lora_A.weight")):
        module = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")  # model.layers.<i>.<linear>
        _, _, layer, linear = module.split(".", 3)
        if linear not in LLAMA_CPP_LINEARS:
            raise ValueError(f"adapter: {module} has no llama.cpp tensor name")
        name = f"blk.{layer}.{LLAMA_CPP_LINEARS[linear]}.weight"
        lora_a = weights[key].float()
        lora_b = weights[key.replace(".lora_A.", ".lora_B.")].float()
        if LLAMA_CPP_LINEARS[linear] in heads:
            lora_b = lora_b[_llama_cpp_rotary_rows(lora_b.shape[0], heads[LLAMA_CPP_LINEARS[linear]])]
        writer.add_tensor(f"{name}.lora_a", lora_a.contiguous().numpy())
        writer.add_tensor(f"{name}.lora_b", lora_b.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out_path)
    return out_path


EXPORT_FORMATS = ("merged", "gguf-lora")


def export_for_other_stacks(
    base: str, adapter_dir: str | os.PathLike[str] | None, export_format: str, out: str | os.PathLike[str]
) -> Path:
    """What `modulora export` and the API's export route write for an adapter trained on `base`:
    "merged", a dense bf16 Hugging Face folder (`export_merged`; without an adapter, the base
    dequantized: the dense form of a quantized base where transformers has no GPTQ backend);
    "gguf-lora", llama.cpp's LoRA GGUF (`export_gguf_lora`), for a GGUF base only (llama.cpp applies
    it to that base file)."""
    from modulora.models import gguf_source, load_model, transformers_folder

    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"format: {export_format!r} is not one of {', '.join(EXPORT_FORMATS)}")
    if export_format == "gguf-lora":
        if adapter_dir is None:
            raise ValueError("adapter: gguf-lora exports an adapter; name one")
        if gguf_source(base) is None:
            raise ValueError(f"format: gguf-lora needs a GGUF base (llama.cpp runs it), not {base!r}")
        base_config = json.loads((transformers_folder(base) / "config.json").read_text())
        return export_gguf_lora(adapter_dir, base_config, out)
    from transformers import AutoTokenizer

    model, tokenizer = load_model(base)
    if adapter_dir is None:
        return export_merged(model, out, tokenizer)
    load_adapter(model, adapter_dir)
    if (Path(adapter_dir) / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)  # with the chat template training used
    return export_merged(model.eval(), out, tokenizer)
