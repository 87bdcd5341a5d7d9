"""LoRA target names, torch-free: LoRA itself, the quantizer and the memory estimate (which the API
runs without torch) all read them here."""

from __future__ import annotations

from collections.abc import Sequence

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linear layers of a LLaMA-family decoder layer, by module name: the "all-linear" targets."""


def target_names(target_modules: str | Sequence[str]) -> tuple[str, ...]:
    """ "all-linear" as ALL_LINEAR; one module name or a list of them as a tuple."""
    if target_modules == "all-linear":
        return ALL_LINEAR
    return (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
