"""A worker SIGKILLed mid-job loses nothing: the lease runs out, a new worker re-enqueues the job,
and it resumes from its latest checkpoint to succeed; no training step is recorded twice."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from openai import OpenAI

from core.config import get_settings
from tests.worker.conftest import LiveService
from tests.worker.test_end_to_end import ROWS, TINY, wait_for

pytestmark = pytest.mark.slow


def test_sigkilled_worker_job_resumes_from_checkpoint_and_succeeds(live_service: LiveService) -> None:
    live_service.kill_workers()  # only the worker started below may take the job
    client = OpenAI(
        base_url=f"{live_service.base_url}/v1", api_key=live_service.new_key("carol"), max_retries=0
    )
    data = "".join(json.dumps(row) + "\n" for row in ROWS).encode()
    training = client.files.create(file=("train.jsonl", io.BytesIO(data)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="smollm2-135m-instruct", training_file=training.id, hyperparameters={**TINY, "max_steps": 3}
    )  # type: ignore[typeddict-unknown-key]
    live_service.start_worker()
    first_checkpoint = Path(get_settings().jobs_dir) / job.id / "checkpoints" / "step-1"
    deadline = time.monotonic() + 1200
    while not first_checkpoint.is_dir():
        assert time.monotonic() < deadline, "no checkpoint was written"
        assert client.fine_tuning.jobs.retrieve(job.id).status in ("queued", "running")
        time.sleep(0.5)
    live_service.kill_workers()
    assert client.fine_tuning.jobs.retrieve(job.id).status == "running"  # nobody told the database

    live_service.start_worker()
    assert wait_for(client, job.id, ("succeeded",)) == "succeeded"
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    steps = [e.data["step"] for e in events if e.type == "metrics"]  # type: ignore[index]
    assert sorted(steps) == [1, 2, 3]
    messages = [e.message for e in events]
    assert any("stopped; the job is queued again" in m for m in messages)
    assert any(m.startswith("Resuming from checkpoint step-") for m in messages)
    assert any("(attempt 2)" in m for m in messages)
