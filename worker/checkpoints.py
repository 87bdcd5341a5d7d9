"""A job's checkpoints in the database: registered from the folders training writes, with the
metrics each folder's own trainer state holds, and pruned to what the job keeps.

`finetune` writes `jobs/<id>/checkpoints/step-N/` after the step's callback has run, so the folder
itself, not the callback, is the record of that step's losses: its `trainer_state.json` holds every
step's training loss and the validation losses computed so far (OpenAI's checkpoint `metrics`).

A job keeps its newest `keep_checkpoints` checkpoints plus the one with the lowest validation loss;
the others lose their folder first and their row second, so a row never outlives its files for
longer than one registration (the next one deletes it again) and a folder is never orphaned.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import select

from core.config import get_settings
from core.db.models import Checkpoint, Job
from core.db.session import session_scope
from modulora.settings import relative_to_home


def checkpoint_metrics(folder: Path) -> dict[str, Any]:
    """OpenAI's checkpoint metrics from a checkpoint folder's trainer state: `step`, `train_loss`
    (that step's), `valid_loss` and `full_valid_loss` (the whole validation file is evaluated, so
    both are the same number; null when the step was not evaluated)."""
    state = json.loads((folder / "trainer_state.json").read_text())
    step, losses = state["step"], state.get("losses", [])
    valid_loss = {int(k): v for k, v in state.get("val_losses", {}).items()}.get(step)
    return {
        "step": step,
        "train_loss": losses[step - 1] if len(losses) >= step else None,
        "valid_loss": valid_loss,
        "full_valid_loss": valid_loss,
    }


def kept_steps(valid_losses: dict[int, float | None], keep: int) -> set[int]:
    """The steps a job keeps: the newest `keep` plus the lowest validation loss (the earliest of
    equals); `valid_losses` maps every checkpoint's step to its validation loss or None."""
    steps = sorted(valid_losses)
    kept = set(steps[-keep:]) if keep > 0 else set()
    evaluated = [(loss, step) for step, loss in valid_losses.items() if loss is not None]
    if evaluated:
        kept.add(min(evaluated)[1])
    return kept


def _steps_on_disk(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return sorted(
        int(p.name[5:])
        for p in root.glob("step-*")
        if p.name[5:].isdigit() and (p / "trainer_state.json").is_file()
    )


def register_checkpoints(job_id: str) -> None:
    """Record the job's checkpoint folders that have no row yet, then prune to what it keeps
    (`keep_checkpoints`; a job without the setting keeps every checkpoint)."""
    settings = get_settings()
    root = settings.jobs_dir / job_id / "checkpoints"
    with session_scope() as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        assert job is not None, job_id
        known = set(session.scalars(select(Checkpoint.step).where(Checkpoint.job_id == job_id)))
        for step in _steps_on_disk(root):
            if step not in known:
                folder = root / f"step-{step}"
                session.add(
                    Checkpoint(
                        job_id=job_id,
                        step=step,
                        path=relative_to_home(folder),
                        metrics=checkpoint_metrics(folder),
                    )
                )
        session.flush()
        keep = job.hyperparameters.get("keep_checkpoints")
        if keep is None:
            return
        rows = list(session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)))
        kept = kept_steps({row.step: row.metrics.get("valid_loss") for row in rows}, keep)
        for row in rows:
            if row.step not in kept:
                shutil.rmtree(settings.home / row.path, ignore_errors=True)
                session.delete(row)
