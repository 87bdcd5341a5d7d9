"""Reading a PEFT LoRA adapter folder into per-layer (A, B) pairs for the adapter bank.

The folder is what `modulora.export.export_adapter` writes (and what PEFT writes):
`adapter_config.json` (r, lora_alpha, use_rslora, target_modules) and `adapter_model.safetensors`
with keys `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`. A chat template saved
beside it (`chat_template.jinja` or `tokenizer_config.json`) is the one training used, so it wins
over the base's.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from api.inference.types import EngineError

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


def read_adapter(folder: Path) -> LoraWeights:
    """Load a PEFT LoRA folder onto the CPU; raises EngineError naming what is missing or unsupported."""
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

    tensors = load_file(str(weights_path))
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight").removeprefix(_PEFT_PREFIX)
        b = tensors.get(key.replace(".lora_A.weight", ".lora_B.weight"))
        if b is None:
            raise EngineError(f"adapter {folder.name}: {key} has no matching lora_B", param="model")
        layers[module] = (a, b)
    if not layers:
        raise EngineError(f"adapter {folder.name}: no lora_A/lora_B tensors found", param="model")
    return LoraWeights(rank=rank, scaling=scaling, layers=layers, chat_template=_read_chat_template(folder))


def _read_chat_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        template = json.loads(tokenizer_config.read_text()).get("chat_template")
        return template if isinstance(template, str) else None
    return None
