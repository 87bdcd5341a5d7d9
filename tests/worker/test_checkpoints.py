"""worker/checkpoints.py: a job's checkpoints registered with their own step's losses, pruned to the
newest few plus the best by validation loss (on disk and in the database alike), and a failed
job's last checkpoint kept for serving."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from core.config import get_settings
from core.db.models import Checkpoint, Job, JobEvent
from core.db.session import session_scope
from modulora.data import build_examples
from modulora.lora import LoraConfig, add_lora_
from modulora.tracking import RunLog
from modulora.train import finetune
from tests.api.conftest import CHAT_ROW, Service, jsonl
from tests.utils.tiny_lm import quantize_rtn_, single_thread, tiny_llama, tiny_tokenizer  # noqa: F401
from worker.checkpoints import kept_steps, register_checkpoints
from worker.tasks import train

ROWS = [{"prompt": f"Question: what is {i} plus {i}?\nAnswer:", "completion": f" {2 * i}"} for i in range(16)]


def new_job(service: Service, **hyperparameters: object) -> tuple[Job, dict[str, str]]:
    """A queued job of user alice, and her key's headers."""
    alice = service.new_key("alice")
    file = service.upload(alice, jsonl([CHAT_ROW], copies=10))
    body = {"model": "smollm2-135m-instruct", "training_file": file["id"], "hyperparameters": hyperparameters}
    response = service.client.post("/v1/fine_tuning/jobs", headers=alice, json=body)
    assert response.status_code == 200, response.text
    with session_scope() as session:
        job = session.scalar(select(Job).where(Job.id == response.json()["id"]))
        assert job is not None
        return job, alice


def checkpoint_rows(job_id: str) -> dict[int, Checkpoint]:
    with session_scope() as session:
        return {c.step: c for c in session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id))}


def folders(job_id: str) -> set[int]:
    root = get_settings().jobs_dir / job_id / "checkpoints"
    return {int(p.name[5:]) for p in root.glob("step-*")}


def write_checkpoint(job_id: str, step: int, losses: list[float], val_losses: dict[int, float]) -> Path:
    """A checkpoint folder as `modulora.checkpoint.save_checkpoint` leaves it (the trainer state and
    an adapter file; the optimizer states are not read here)."""
    folder = get_settings().jobs_dir / job_id / "checkpoints" / f"step-{step}"
    folder.mkdir(parents=True)
    state = {"step": step, "losses": losses[:step], "val_losses": {str(s): v for s, v in val_losses.items()}}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    (folder / "adapter.safetensors").write_bytes(b"weights")
    return folder


def test_kept_steps_are_the_newest_few_and_the_best_by_validation_loss() -> None:
    assert kept_steps({2: 1.5, 4: 0.9, 6: 1.1, 8: None, 10: 1.3}, keep=2) == {8, 10, 4}
    assert kept_steps({2: None, 4: None, 6: None}, keep=1) == {6}
    assert kept_steps({2: 1.0, 4: 1.0, 6: 2.0}, keep=1) == {2, 6}  # the earliest of equal bests


def test_each_checkpoint_keeps_its_own_steps_train_and_validation_loss(
    service: Service, tmp_path: Path
) -> None:
    """The step callback runs before its step's checkpoint is written: the rows must still carry
    that step's losses (it once gave step 2 `train_loss: None`)."""
    job, _ = new_job(
        service,
        max_steps=5,
        batch_size=4,
        micro_batch_size=4,
        checkpoint_every=1,
        eval_every=2,
        keep_checkpoints=10,
    )
    tokenizer = tiny_tokenizer()
    examples = build_examples(ROWS, "auto", tokenizer, max_seq_len=64)
    model = quantize_rtn_(tiny_llama(), bits=4)
    add_lora_(model, LoraConfig(r=4, alpha=8))
    output_dir = get_settings().jobs_dir / job.id
    config = train._train_config(job, output_dir, torch.device("cpu"), micro_batch=4)  # the worker's
    with RunLog(output_dir / "tensorboard") as run_log:
        recorder = train.MetricsRecorder(job, run_log)
        finetune(model, tokenizer, examples[:12], config, examples[12:], callback=recorder)
    register_checkpoints(job.id)  # what the worker does when training returns

    with session_scope() as session:
        steps = {
            e.step: e.data
            for e in session.scalars(
                select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.type == "metrics")
            )
        }
    rows = checkpoint_rows(job.id)
    assert sorted(rows) == [1, 2, 3, 4, 5] and folders(job.id) == {1, 2, 3, 4, 5}
    for step, row in rows.items():
        valid = steps[step].get("valid_loss")
        assert row.metrics == {
            "step": step,
            "train_loss": steps[step]["train_loss"],
            "valid_loss": valid,
            "full_valid_loss": valid,
        }
    assert [s for s in rows if rows[s].metrics["valid_loss"] is not None] == [
        2,
        4,
        5,
    ]  # every 2, and the last


def test_older_checkpoints_leave_disk_and_database_together_but_the_best_stays(service: Service) -> None:
    job, _ = new_job(service, keep_checkpoints=2)
    losses = [3.0, 2.5, 2.0, 1.8, 1.7, 1.6]
    val = {2: 0.5, 4: 0.8}
    for step in range(1, 6):
        write_checkpoint(job.id, step, losses, {s: v for s, v in val.items() if s <= step})
    register_checkpoints(job.id)
    assert set(checkpoint_rows(job.id)) == folders(job.id) == {2, 4, 5}  # the newest two and the best

    write_checkpoint(job.id, 6, losses, val | {6: 0.4})  # a new best
    register_checkpoints(job.id)
    assert set(checkpoint_rows(job.id)) == folders(job.id) == {5, 6}
    assert checkpoint_rows(job.id)[6].metrics == {
        "step": 6,
        "train_loss": 1.6,
        "valid_loss": 0.4,
        "full_valid_loss": 0.4,
    }


def test_a_job_from_before_the_setting_keeps_every_checkpoint(service: Service) -> None:
    job, _ = new_job(service)
    with session_scope() as session:
        stored = session.scalar(select(Job).where(Job.id == job.id))
        assert stored is not None
        stored.hyperparameters = {k: v for k, v in stored.hyperparameters.items() if k != "keep_checkpoints"}
    for step in range(1, 6):
        write_checkpoint(job.id, step, [1.0] * 5, {})
    register_checkpoints(job.id)
    assert set(checkpoint_rows(job.id)) == {1, 2, 3, 4, 5}


def test_a_failed_jobs_last_checkpoint_is_registered_listed_and_downloaded(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    job, alice = new_job(service)

    def fails_after_a_checkpoint(job_id: str, heartbeat: object) -> None:
        write_checkpoint(job_id, 3, [2.0, 1.5, 1.25], {})  # written after step 3's callback ran
        raise RuntimeError("device lost")

    monkeypatch.setattr(train, "_run", fails_after_a_checkpoint)
    train.run_job(job.id, "w1")

    public = service.client.get(f"/v1/fine_tuning/jobs/{job.id}", headers=alice).json()
    assert public["status"] == "failed" and public["phase"] is None
    (checkpoint,) = service.client.get(f"/v1/fine_tuning/jobs/{job.id}/checkpoints", headers=alice).json()[
        "data"
    ]
    assert checkpoint["step_number"] == 3 and checkpoint["metrics"]["train_loss"] == 1.25
    download = service.client.get(f"/v1/dashboard/checkpoints/{checkpoint['id']}/download", headers=alice)
    assert download.status_code == 200, download.text
    names = zipfile.ZipFile(io.BytesIO(download.content)).namelist()
    assert f"{checkpoint['id']}/adapter.safetensors" in names
