"""LoRA adapters on top of frozen (quantized or dense) linear layers, with PEFT's names and init.

`add_lora_(model, LoraConfig(...))` wraps each targeted linear in a `LoraLinear`. The module tree
then reads `...q_proj.base_layer` / `...q_proj.lora_A.default.weight` exactly as in PEFT, so
exporting an adapter is a key rename and `peft` can load what we write.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from modulora.targets import target_names

LORA_CONFIG_VERSION = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass
class LoraConfig:
    """r: rank; alpha: scale numerator (scaling = alpha/r, or alpha/sqrt(r) with use_rslora);
    target_modules: "all-linear" or a list of module-name suffixes such as ["q_proj", "v_proj"];
    dtype: the adapter weights' dtype ("float32" or "bfloat16")."""

    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    use_rslora: bool = False
    dtype: str = "float32"
    version: int = LORA_CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"r: {self.r} must be a positive integer")
        if self.alpha <= 0:
            raise ValueError(f"alpha: {self.alpha} must be positive")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: {self.dropout} must be in [0, 1)")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {sorted(_DTYPES)}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [self.target_modules]
        if not self.targets:
            raise ValueError("target_modules: empty")

    @property
    def targets(self) -> tuple[str, ...]:
        return target_names(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class LoraLinear(nn.Module):
    """y = base(x) + B(A(dropout(x)))·scaling, B zero-initialized so a new adapter changes nothing."""

    def __init__(self, base_layer: nn.Module, config: LoraConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active_adapter = adapter_name
        self.add_adapter(adapter_name, config)

    def add_adapter(self, name: str, config: LoraConfig) -> None:
        dtype = _DTYPES[config.dtype]
        device = next(iter(self.base_layer.buffers()), next(iter(self.base_layer.parameters()), None))
        device = device.device if device is not None else None
        self.lora_A[name] = nn.Linear(self.in_features, config.r, bias=False, dtype=dtype, device=device)
        self.lora_B[name] = nn.Linear(config.r, self.out_features, bias=False, dtype=dtype, device=device)
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling[name] = config.scaling
        # PEFT's init (and the LoRA paper's): A Kaiming-uniform, B zero.
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        name = self.active_adapter
        if name is None:
            return result
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        h = self.lora_dropout[name](x)
        if not torch.is_autocast_enabled(x.device.type):
            h = h.to(lora_a.weight.dtype)
        return result + (lora_b(lora_a(h)) * self.scaling[name]).to(result.dtype)

    def delta_weight(self, name: str = "default") -> torch.Tensor:
        """The adapter's dense update B·A·scaling [out_features, in_features] (float32)."""
        return (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]


def add_lora_(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> list[str]:
    """Freeze `model` and wrap every targeted linear layer in a `LoraLinear`; returns the wrapped names."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        parent_name, _, leaf = name.rpartition(".")
        if leaf not in config.targets or not hasattr(module, "in_features") or isinstance(module, LoraLinear):
            continue
        parent = model.get_submodule(parent_name)
        if isinstance(parent, LoraLinear):
            continue
        setattr(parent, leaf, LoraLinear(module, config, adapter_name))
        wrapped.append(name)
    if not wrapped:
        raise ValueError(f"target_modules: none of {list(config.targets)} found in the model")
    return wrapped


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter weights keyed as in our module tree (`...q_proj.lora_A.default.weight`)."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{name}.lora_A.{adapter_name}.weight"] = layer.lora_A[adapter_name].weight
        state[f"{name}.lora_B.{adapter_name}.weight"] = layer.lora_B[adapter_name].weight
    return state
