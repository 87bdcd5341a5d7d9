"""Faults on the live service (PostgreSQL + Redis): workers SIGKILLed at random points of a job,
the API killed mid-upload, Redis restarted mid-job, two workers racing for one job. Every job ends
`succeeded`, every training step is recorded exactly once, and nothing is left behind.

`MODULORA_FAULTS_KILL_TRIALS` (default 1) sets the SIGKILL trials per phase; docs/reliability.md
has the table of a longer run.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from openai import OpenAI

from core.bases import job_base
from core.config import get_settings
from tests.faults.conftest import REPO, FaultStack
from tests.worker.test_end_to_end import ROWS, TINY, wait_for

pytestmark = pytest.mark.slow
KILL_TRIALS = int(os.environ.get("MODULORA_FAULTS_KILL_TRIALS", "1"))
STEPS = 3


def client_for(stack: FaultStack, user: str) -> OpenAI:
    return OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.new_key(user), max_retries=0)


def new_job(client: OpenAI, **hyperparameters: object) -> str:
    data = "".join(json.dumps(row) + "\n" for row in ROWS).encode()
    training = client.files.create(file=("train.jsonl", io.BytesIO(data)), purpose="fine-tune")
    hp = {**TINY, "max_steps": STEPS, **hyperparameters}
    return client.fine_tuning.jobs.create(
        model="smollm2-135m-instruct", training_file=training.id, hyperparameters=hp
    ).id  # type: ignore[typeddict-unknown-key]


def assert_clean_success(client: OpenAI, job_id: str) -> None:
    """Succeeded, steps 1..STEPS once each, and no temporary folder left in its storage."""
    assert wait_for(client, job_id, ("succeeded",), timeout=900) == "succeeded"
    events = list(client.fine_tuning.jobs.list_events(job_id, limit=100))
    steps = [e.data["step"] for e in events if e.type == "metrics"]  # type: ignore[index]
    assert sorted(steps) == list(range(1, STEPS + 1)), steps
    settings = get_settings()
    leftovers = [
        p for root in (settings.jobs_dir / job_id, settings.adapters_dir) for p in root.rglob("*.tmp*")
    ]
    assert leftovers == [], leftovers


def _has_event(client: OpenAI, job_id: str, predicate: Callable[[object], bool]) -> bool:
    return any(predicate(e) for e in client.fine_tuning.jobs.list_events(job_id, limit=100))


def _kill_point(phase: str, client: OpenAI, job_id: str) -> Callable[[], bool]:
    """When the job is in `phase`: quantizing the base, training, writing a checkpoint, exporting."""
    settings = get_settings()
    if phase == "quantization":
        return lambda: _has_event(client, job_id, lambda e: e.message.startswith("Quantizing"))
    if phase == "training":
        return lambda: _has_event(client, job_id, lambda e: e.type == "metrics")
    if phase == "checkpoint":
        checkpoints = settings.jobs_dir / job_id / "checkpoints"
        return lambda: checkpoints.is_dir() and any(checkpoints.glob(".step-*.tmp"))
    if phase == "export":
        return lambda: (
            any(settings.adapters_dir.glob(f".{job_id}.tmp-*")) or (settings.adapters_dir / job_id).is_dir()
        )
    raise ValueError(phase)


def wait_until(condition: Callable[[], bool], timeout: float, poll: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll)
    return False


@pytest.fixture
def no_workers(stack: FaultStack) -> Iterator[FaultStack]:
    stack.kill_workers()
    yield stack
    stack.kill_workers()


@pytest.mark.parametrize("trial", range(KILL_TRIALS))
@pytest.mark.parametrize("phase", ["quantization", "training", "checkpoint", "export"])
def test_worker_sigkilled_at_a_random_point_resumes_and_succeeds(
    no_workers: FaultStack, phase: str, trial: int
) -> None:
    stack = no_workers
    client = client_for(stack, f"kill-{phase}-{trial}")
    job_id = new_job(client, **({"quantization": "rtn"} if phase == "quantization" else {}))
    if phase == "quantization":  # a cached base is never quantized again: this job must build its own
        job = client.fine_tuning.jobs.retrieve(job_id)
        shutil.rmtree(
            job_base(job.model, job.hyperparameters.model_dump(), job.training_file), ignore_errors=True
        )
    stack.start_worker()
    reached = wait_until(_kill_point(phase, client, job_id), timeout=900)
    time.sleep(random.uniform(0, 0.3))
    stack.kill_workers()
    assert reached, f"the job never reached {phase}"
    stack.start_worker()
    assert_clean_success(client, job_id)


def test_two_workers_racing_for_one_job_run_it_once(no_workers: FaultStack) -> None:
    stack = no_workers
    client = client_for(stack, "race")
    job_id = new_job(client)
    # The same job delivered twice (a redelivery), to two idle workers at once.
    subprocess.run(
        [sys.executable, "-c", f"from core.tasks import enqueue_training; enqueue_training({job_id!r})"],
        cwd=REPO, env=stack.env, check=True, timeout=60,
    )  # fmt: skip
    stack.start_worker()
    stack.start_worker()
    assert_clean_success(client, job_id)
    starts = [
        e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=100) if "Started on" in e.message
    ]
    assert len(starts) == 1, starts


def restart_redis() -> None:
    subprocess.run(["redis-cli", "-p", "6379", "shutdown", "nosave"], check=False, timeout=30)
    subprocess.run(
        ["redis-server", "--bind", "127.0.0.1", "--port", "6379", "--daemonize", "yes", "--save", "",
         "--appendonly", "no"],
        check=True, timeout=30,
    )  # fmt: skip
    assert wait_until(
        lambda: subprocess.run(["redis-cli", "ping"], capture_output=True).stdout == b"PONG\n", 30
    )


def test_redis_restarted_mid_job_loses_nothing(no_workers: FaultStack) -> None:
    stack = no_workers
    client = client_for(stack, "redis")
    job_id = new_job(client)
    stack.start_worker()
    assert wait_until(_kill_point("training", client, job_id), timeout=900)
    restart_redis()
    assert_clean_success(client, job_id)


def test_api_killed_mid_upload_stores_nothing_and_its_temp_file_is_swept(stack: FaultStack) -> None:
    key = {"Authorization": f"Bearer {stack.new_key('upload-kill')}"}
    line = (json.dumps(ROWS[0]) + "\n").encode()
    files_dir = get_settings().files_dir

    def slow_body() -> Iterator[bytes]:
        boundary = b"--killed"
        yield boundary + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        yield boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n\r\n'
        for _ in range(600):
            yield line * 200
            time.sleep(0.01)

    def upload() -> None:
        headers = {**key, "Content-Type": "multipart/form-data; boundary=killed"}
        try:
            httpx.post(f"{stack.base_url}/v1/files", headers=headers, content=slow_body(), timeout=60)
        except httpx.HTTPError:
            pass  # the server died under it

    uploader = threading.Thread(target=upload)
    uploader.start()
    assert wait_until(lambda: any(files_dir.glob(".tmp-*")), timeout=30), "the upload never started"
    stack.kill_api()
    uploader.join(timeout=60)
    assert any(files_dir.glob(".tmp-*"))  # what the killed API left
    stack.start_api()
    assert not any(files_dir.glob(".tmp-*"))
    assert httpx.get(f"{stack.base_url}/v1/files", headers=key).json()["data"] == []


def test_full_disk_during_a_checkpoint_fails_the_job_cleanly(no_workers: FaultStack) -> None:
    """The job's folder on a 256 KiB tmpfs: the first checkpoint cannot be written. The job ends
    `failed` with the reason, no checkpoint is registered, and the next job trains as usual."""
    stack = no_workers
    client = client_for(stack, "full-disk")
    job_id = new_job(client)
    folder = get_settings().jobs_dir / job_id
    folder.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], check=False)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        stack.start_worker()
        assert wait_for(client, job_id, ("failed",), timeout=900) == "failed"
        job = client.fine_tuning.jobs.retrieve(job_id)
        assert job.error is not None and "No space left on device" in job.error.message, job.error
        assert list(client.fine_tuning.jobs.checkpoints.list(job_id)) == []
    finally:
        stack.kill_workers()
        subprocess.run(["umount", str(folder)], check=False)
    stack.start_worker()
    assert_clean_success(client, new_job(client))
