"""A run's step metrics where people look for them: TensorBoard event files (always), Weights &
Biases (when asked for and installed; offline unless WANDB_MODE says otherwise), and OpenAI's
step-metrics CSV (a fine-tuning job's result file).

    with RunLog(out_dir / "tensorboard", wandb={"project": "demo"}, config=hp) as log:
        log.log(step, {"train_loss": 1.2, "learning_rate": 2e-4})
    (out_dir / STEP_METRICS_FILE).write_text(step_metrics_csv(rows))
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Self

STEP_METRICS_FILE = "step_metrics.csv"
# OpenAI's columns, in its order; a metric a run does not compute stays an empty cell, as in OpenAI's
# own files for steps without validation.
STEP_METRICS_COLUMNS = (
    "step",
    "train_loss",
    "train_accuracy",
    "valid_loss",
    "valid_mean_token_accuracy",
    "full_valid_loss",
    "full_valid_mean_token_accuracy",
)


def step_metrics_csv(rows: Iterable[dict[str, Any]]) -> str:
    """OpenAI's step-metrics CSV: one row per step in step order, columns `STEP_METRICS_COLUMNS`."""
    out = io.StringIO()
    writer = csv.DictWriter(out, STEP_METRICS_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: r["step"]):
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in STEP_METRICS_COLUMNS})
    return out.getvalue()


def wandb_available() -> bool:
    return importlib.util.find_spec("wandb") is not None


class RunLog:
    """TensorBoard scalars under `log_dir` (one tag per metric), mirrored to a W&B run when `wandb`
    holds OpenAI's integration settings (project, name, entity, tags) and the package is installed.

    W&B runs offline (files under `log_dir/wandb`, `wandb sync` uploads them) unless the environment
    sets WANDB_MODE: a worker never needs credentials or the network to finish a job.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        wandb: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(str(self.log_dir))
        self._wandb_run = None
        if wandb is not None and wandb_available():
            import wandb as wandb_lib

            self._wandb_run = wandb_lib.init(
                project=wandb.get("project"),
                name=wandb.get("name"),
                entity=wandb.get("entity"),
                tags=wandb.get("tags"),
                config=config,
                dir=str(self.log_dir),
                mode=os.environ.get("WANDB_MODE", "offline"),
            )

    @property
    def wandb_dir(self) -> Path | None:
        """The W&B run's folder, when one was started."""
        return Path(self._wandb_run.dir).parent if self._wandb_run is not None else None

    def log(self, step: int, metrics: dict[str, float | int | None]) -> None:
        """One step's numbers; None values are skipped."""
        values = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)

    def close(self) -> None:
        self._writer.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
