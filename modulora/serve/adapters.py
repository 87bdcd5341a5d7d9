"""Reading a PEFT LoRA adapter folder into per-layer (A, B) pairs for the adapter bank.

The folder is what `modulora.export.export_adapter` writes (and what PEFT writes):
`adapter_config.json` (r, lora_alpha, use_rslora, target_modules) and `adapter_model.safetensors`
with keys `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`. A chat template saved
beside it (`chat_template.jinja` or `tokenizer_config.json`) is the one training used, so it wins
over the base's.

A training checkpoint (`modulora.checkpoint`: `adapter.safetensors` with the model's parameter
names, `<module path>.lora_A.default.weight`) carries no LoRA config; its scaling comes from the
job's hyperparameters.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from modulora.serve.types import EngineError

_PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass
class LoraWeights:
    """One adapter: `layers` maps a module path of the base (`model.layers.0.self_attn.q_proj`)
    to (A [r, in], B [out, r]); B·A·scaling is the layer's update."""

    rank: int
    scaling: float
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    chat_template: str | None = None

    @property
    def nbytes(self) -> int:
        return sum(
            a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.layers.values()
        )


def read_adapter(folder: Path, checkpoint_scaling: float | None = None) -> LoraWeights:
    """Load a PEFT LoRA folder (or, given its scaling, a training checkpoint) onto the CPU.

    Raises EngineError naming what is missing or unsupported.
    """
    if checkpoint_scaling is not None:
        return _read_checkpoint(folder, checkpoint_scaling)
    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise EngineError(
            f"adapter folder {folder} needs adapter_config.json and adapter_model.safetensors",
            code="model_not_found",
            param="model",
        )
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora", False):
        raise EngineError(f"adapter {folder.name}: only plain LoRA adapters are servable", param="model")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / (math.sqrt(rank) if config.get("use_rslora", False) else rank)

    layers = _pairs(load_file(str(weights_path)), ".lora_A.weight", ".lora_B.weight", folder)
    layers = {module.removeprefix(_PEFT_PREFIX): pair for module, pair in layers.items()}
    return LoraWeights(rank=rank, scaling=scaling, layers=layers, chat_template=_read_chat_template(folder))


def _read_checkpoint(folder: Path, scaling: float) -> LoraWeights:
    weights_path = folder / "adapter.safetensors"
    if not weights_path.is_file():
        raise EngineError(f"checkpoint folder {folder} has no adapter.safetensors", code="model_not_found")
    layers = _pairs(load_file(str(weights_path)), ".lora_A.default.weight", ".lora_B.default.weight", folder)
    rank = max(a.shape[0] for a, _ in layers.values())
    return LoraWeights(rank=rank, scaling=scaling, layers=layers)


def _pairs(
    tensors: dict[str, torch.Tensor], a_suffix: str, b_suffix: str, folder: Path
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (A, B)} from tensors named `<module path><a_suffix>` / `<b_suffix>`."""
    layers = {}
    for key, a in tensors.items():
        if key.endswith(a_suffix):
            b = tensors.get(key.removesuffix(a_suffix) + b_suffix)
            if b is None:
                raise EngineError(f"adapter {folder.name}: {key} has no matching lora_B", param="model")
            layers[key.removesuffix(a_suffix)] = (a, b)
    if not layers:
        raise EngineError(f"adapter {folder.name}: no lora_A/lora_B tensors found", param="model")
    return layers


def _read_chat_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        template = json.loads(tokenizer_config.read_text()).get("chat_template")
        return template if isinstance(template, str) else None
    return None
