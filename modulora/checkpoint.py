"""Training checkpoints: `output_dir/checkpoints/step-N/` with the adapter, optimizer, scheduler,
grad-scaler and RNG states and the trainer state (step, losses); written atomically."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The `checkpoints/step-N` folder with the largest N under `output_dir`, or None."""
    root = Path(output_dir) / "checkpoints"
    steps = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()] if root.is_dir() else []
    return max(steps, key=lambda p: int(p.name[5:]), default=None)


def save_checkpoint(
    output_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    state: dict[str, Any],
    keep: int = 0,
) -> Path:
    """Write `checkpoints/step-N/` atomically (temporary folder, then rename); prune old ones."""
    root = Path(output_dir) / "checkpoints"
    final = root / f"step-{state['step']}"
    tmp = root / f".step-{state['step']}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {k: v.detach().contiguous() for k, v in trainable_parameters(model).items()},
        tmp / "adapter.safetensors",
    )
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
        },
        tmp / "optimizer.pt",
    )
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if keep:
        older = sorted(
            (p for p in root.glob("step-*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:])
        )
        for old in older[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
) -> dict[str, Any]:
    """Restore adapter, optimizer, scheduler, scaler and RNG states; returns the trainer state."""
    path = Path(path)
    if not (path / "trainer_state.json").is_file():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"resume_from: no checkpoint in {path}")
        path = found
    params = trainable_parameters(model)
    weights = load_file(path / "adapter.safetensors")
    if set(weights) != set(params):
        raise ValueError(
            f"resume_from: {path} holds {len(weights)} adapter tensors, the model trains {len(params)}"
        )
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    states = torch.load(path / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    scaler.load_state_dict(states["scaler"])
    rng = torch.load(path / "rng.pt", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / "trainer_state.json").read_text())
