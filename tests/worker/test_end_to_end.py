"""The stock `openai` SDK against a live server with a real Celery worker on Redis, training the
real SmolLM2-135M on its native GGUF Q4_1 base (4-bit, the cheapest base: nothing to quantize).

Steps are few and tiny (batch 1, 48 tokens) because every step re-materializes every layer on CPU.
"""

from __future__ import annotations

import io
import json
import threading
import time

import httpx
import pytest
from openai import ConflictError, NotFoundError, OpenAI

from tests.worker.conftest import LiveService

pytestmark = pytest.mark.slow
ROWS = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                      {"role": "assistant", "content": str(2 * i)}]} for i in range(12)]  # fmt: skip
TINY = {"quantization": "gguf", "bits": 4, "batch_size": 1, "max_seq_len": 48, "lora_r": 4,
        "checkpoint_every": 1}  # fmt: skip
FINAL = ("succeeded", "failed", "cancelled")


def wait_for(client: OpenAI, job_id: str, statuses: tuple[str, ...], timeout: float = 1200) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.fine_tuning.jobs.retrieve(job_id).status
        if status in statuses:
            return status
        if status in FINAL:
            events = [e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=100)]
            pytest.fail(f"job {job_id} ended {status} while waiting for {statuses}: {events}")
        time.sleep(1)
    pytest.fail(f"job {job_id} did not reach {statuses} in {timeout} s")


def wait_for_first_step(client: OpenAI, job_id: str, timeout: float = 1200) -> None:
    deadline = time.monotonic() + timeout
    while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job_id, limit=100).data):
        assert time.monotonic() < deadline, f"job {job_id} trained no step in {timeout} s"
        assert client.fine_tuning.jobs.retrieve(job_id).status in ("queued", "running")
        time.sleep(1)


def read_sse(url: str, key: str, messages: list[dict], last_event_id: str | None = None) -> None:
    headers = {"Authorization": f"Bearer {key}"} | ({"Last-Event-ID": last_event_id} if last_event_id else {})
    with httpx.stream("GET", url, headers=headers, timeout=None) as response:
        current: dict = {}
        for line in response.iter_lines():
            if line == "" and current:
                messages.append(current)
                current = {}
            elif line and not line.startswith(":"):
                field, _, value = line.partition(": ")
                current[field] = json.loads(value) if field == "data" else value


def test_openai_sdk_uploads_trains_pages_cancels_and_reads_checkpoints(live_service: LiveService) -> None:
    key = live_service.new_key("alice")
    client = OpenAI(base_url=f"{live_service.base_url}/v1", api_key=key, max_retries=0)
    live_service.start_worker()

    data = "".join(json.dumps(row) + "\n" for row in ROWS).encode()
    training = client.files.create(file=("train.jsonl", io.BytesIO(data)), purpose="fine-tune")
    assert training.id.startswith("file-") and training.bytes == len(data)
    assert client.files.content(training.id).content == data

    held_out = "".join(json.dumps(row) + "\n" for row in ROWS[:2]).encode()
    validation = client.files.create(file=("valid.jsonl", io.BytesIO(held_out)), purpose="fine-tune")
    request = dict(
        model="smollm2-135m-instruct",
        training_file=training.id,
        validation_file=validation.id,
        suffix="e2e",
        hyperparameters={**TINY, "max_steps": 2},
        extra_headers={"Idempotency-Key": "e2e-job-a"},
    )
    job = client.fine_tuning.jobs.create(**request)  # type: ignore[arg-type]
    again = client.fine_tuning.jobs.create(**request)  # type: ignore[arg-type]  # a retry: the same job
    assert again.id == job.id and job.status == "queued"
    with pytest.raises(ConflictError, match="Idempotency-Key"):  # the key with another body
        client.fine_tuning.jobs.create(**{**request, "suffix": "other"})  # type: ignore[arg-type]

    stream: list[dict] = []
    url = f"{live_service.base_url}/v1/fine_tuning/jobs/{job.id}/metrics/stream"
    follower = threading.Thread(target=read_sse, args=(url, key, stream), daemon=True)
    follower.start()
    assert wait_for(client, job.id, ("succeeded",)) == "succeeded"
    follower.join(timeout=30)
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.fine_tuned_model == f"ft:smollm2-135m-instruct:e2e:{job.id}" and done.trained_tokens
    assert [m["data"]["step"] for m in stream if m.get("event") == "metrics"] == [1, 2]
    assert stream[-1] == {"event": "done", "data": {"status": "succeeded"}}
    replay: list[dict] = []
    first_step = next(m for m in stream if m.get("event") == "metrics")
    read_sse(url, key, replay, last_event_id=first_step["id"])
    assert [m["data"]["step"] for m in replay if m.get("event") == "metrics"] == [2]

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=3))  # auto-paging, 3 per request
    metrics = [e for e in events if e.type == "metrics"]
    assert sorted(e.data["step"] for e in metrics) == [1, 2]  # type: ignore[index]
    assert {"train_loss", "step_time_s", "tokens_per_s", "memory_peak_bytes", "eta_s"} <= set(metrics[0].data)  # type: ignore[arg-type]
    assert any(e.message.startswith("Validation loss") for e in events)
    steps = sorted(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id))
    assert steps == [1, 2]
    models = {m.id: m for m in client.models.list()}
    assert models[done.fine_tuned_model].parent == "smollm2-135m-instruct"  # type: ignore[attr-defined]

    second = client.fine_tuning.jobs.create(
        model="smollm2-135m-instruct", training_file=training.id, hyperparameters={**TINY, "max_steps": 50}
    )  # type: ignore[typeddict-unknown-key]
    wait_for_first_step(client, second.id)
    client.fine_tuning.jobs.cancel(second.id)
    assert wait_for(client, second.id, ("cancelled",)) == "cancelled"
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(second.id))
    assert checkpoints and checkpoints[0].step_number < 50  # stopped early, with a usable checkpoint
    assert checkpoints[0].fine_tuned_model_checkpoint.endswith(f"ckpt-step-{checkpoints[0].step_number}")

    first_page = client.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in first_page.data] == [second.id] and first_page.has_more
    assert [j.id for j in client.fine_tuning.jobs.list(limit=1)] == [second.id, job.id]  # iterates every page
    assert client.fine_tuning.jobs.list(after=job.id).data == []

    bob = OpenAI(base_url=f"{live_service.base_url}/v1", api_key=live_service.new_key("bob"), max_retries=0)
    with pytest.raises(NotFoundError):
        bob.fine_tuning.jobs.retrieve(job.id)
