"""Where a run's metrics go: TensorBoard event files, a W&B run (offline), OpenAI's step-metrics CSV."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from modulora.tracking import STEP_METRICS_COLUMNS, RunLog, step_metrics_csv


def test_step_metrics_csv_has_openais_columns_in_step_order_with_empty_missing_cells() -> None:
    text = step_metrics_csv([{"step": 2, "train_loss": 1.5, "valid_loss": 1.7, "learning_rate": 1e-4},
                             {"step": 1, "train_loss": 2.0}])  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(text)))
    assert text.splitlines()[0] == ",".join(STEP_METRICS_COLUMNS)
    assert (
        [r["step"] for r in rows] == ["1", "2"]
        and rows[0]["valid_loss"] == ""
        and rows[1]["valid_loss"] == "1.7"
    )
    assert "learning_rate" not in rows[0]  # not one of OpenAI's columns


def test_run_log_writes_tensorboard_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunLog(tmp_path / "tb") as log:
        log.log(1, {"train_loss": 2.0, "valid_loss": None})
        log.log(2, {"train_loss": 1.5, "valid_loss": 1.7})
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("train_loss")] == [(1, 2.0), (2, 1.5)]
    assert [s.step for s in events.Scalars("valid_loss")] == [2]
    assert log.wandb_dir is None


def test_run_log_mirrors_to_an_offline_wandb_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb", reason="W&B logging runs where wandb is installed")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default, no key or network needed
    monkeypatch.setenv("WANDB_SILENT", "true")
    with RunLog(
        tmp_path / "tb", wandb={"project": "tests", "name": "tiny", "tags": ["a"]}, config={"lr": 1}
    ) as log:
        log.log(1, {"train_loss": 2.0})
        run_dir = log.wandb_dir
    assert run_dir is not None and run_dir.name.startswith("offline-run-")
    assert run_dir.is_relative_to(tmp_path) and any(run_dir.glob("*.wandb"))
