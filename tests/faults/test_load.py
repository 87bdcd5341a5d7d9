"""Load on the live service (PostgreSQL + Redis): `/health` answers within 1 s while a 50 MB file
is uploaded and validated, while 40 metric streams are open, and while 20 chats arrive at a cold
engine at once, every one of which succeeds."""

from __future__ import annotations

import concurrent.futures
import json
import os
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from tests.faults.conftest import FaultStack

pytestmark = pytest.mark.slow
HEALTH_LIMIT_S = 1.0
UPLOAD_MB = int(os.environ.get("MODULORA_FAULTS_UPLOAD_MB", "50"))
"""50 MB (~270k chat rows) takes about 4 minutes to validate on 2 CPU cores."""
ROW = {
    "messages": [
        {"role": "user", "content": "What is the capital of France? " * 3},
        {"role": "assistant", "content": "Paris is the capital of France. " * 3},
    ]
}


def probe_health(url: str, stop: threading.Event, latencies: list[float]) -> None:
    """GET /health every 0.2 s until `stop`; each answer's latency (a timeout counts as 10 s)."""
    with httpx.Client(timeout=10) as client:
        while not stop.is_set():
            started = time.monotonic()
            try:
                assert client.get(f"{url}/health").status_code == 200
                latencies.append(time.monotonic() - started)
            except (httpx.HTTPError, AssertionError):
                latencies.append(10.0)
            stop.wait(0.2)


def while_probing(url: str, work: Callable[[], object]) -> tuple[object, list[float]]:
    """`work()` while /health is probed; (its result, the probes' latencies)."""
    httpx.get(f"{url}/health", timeout=10)  # the first probe would time the pool's first connection
    stop, latencies = threading.Event(), []
    prober = threading.Thread(target=probe_health, args=(url, stop, latencies))
    prober.start()
    try:
        return work(), latencies
    finally:
        stop.set()
        prober.join()


def test_health_answers_within_a_second_during_a_50_mb_upload(stack: FaultStack) -> None:
    key = {"Authorization": f"Bearer {stack.new_key('uploader')}"}
    line = (json.dumps(ROW) + "\n").encode()
    content = line * (UPLOAD_MB * 1024 * 1024 // len(line))

    def upload() -> httpx.Response:
        files = {"file": ("big.jsonl", content)}
        return httpx.post(
            f"{stack.base_url}/v1/files",
            headers=key,
            files=files,
            data={"purpose": "fine-tune"},
            timeout=1200,
        )

    response, latencies = while_probing(stack.base_url, upload)
    assert response.status_code == 200, response.text
    assert response.json()["report"]["rows"] == len(content) // len(line)
    assert len(latencies) >= 5 and max(latencies) < HEALTH_LIMIT_S, sorted(latencies)[-5:]


def test_forty_metric_streams_leave_health_and_other_users_served(stack: FaultStack) -> None:
    owner = {"Authorization": f"Bearer {stack.new_key('watcher')}"}
    other = {"Authorization": f"Bearer {stack.new_key('other')}"}
    files = {"file": ("t.jsonl", (json.dumps(ROW) + "\n").encode() * 12)}
    file = httpx.post(f"{stack.base_url}/v1/files", headers=owner, files=files, data={"purpose": "fine-tune"})
    # A job no worker takes (its queue has none while this runs): its stream stays open.
    job = httpx.post(
        f"{stack.base_url}/v1/fine_tuning/jobs",
        headers=owner,
        json={"model": "smollm2-135m-instruct", "training_file": file.json()["id"]},
    ).json()
    stack.kill_workers()
    opened = threading.Barrier(41)
    stop = threading.Event()

    def stream() -> None:
        url = f"{stack.base_url}/v1/fine_tuning/jobs/{job['id']}/metrics/stream"
        with httpx.stream("GET", url, headers=owner, timeout=60) as response:
            assert response.status_code == 200
            opened.wait()
            for _ in response.iter_lines():
                if stop.is_set():
                    return

    def others_requests() -> list[int]:
        opened.wait()
        statuses = []
        for _ in range(10):
            statuses.append(httpx.get(f"{stack.base_url}/v1/files", headers=other, timeout=10).status_code)
            time.sleep(0.2)
        return statuses

    with concurrent.futures.ThreadPoolExecutor(41) as pool:
        streams = [pool.submit(stream) for _ in range(40)]
        statuses, latencies = while_probing(stack.base_url, others_requests)
        stop.set()
        httpx.post(
            f"{stack.base_url}/v1/fine_tuning/jobs/{job['id']}/cancel", headers=owner
        )  # ends the streams
        for future in streams:
            future.result(timeout=30)
    assert statuses == [200] * 10
    assert max(latencies) < HEALTH_LIMIT_S, sorted(latencies)[-5:]


def test_twenty_concurrent_cold_chats_all_succeed_with_health_answering(stack: FaultStack) -> None:
    # Four users, five chats each: under the per-user limit of 8 requests in flight.
    keys = [{"Authorization": f"Bearer {stack.new_key(f'chatter-{i}')}"} for i in range(4)]
    body = {
        "model": "smollm2-135m-instruct",
        "max_tokens": 8,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Say hello."}],
    }

    def chats() -> list[httpx.Response]:
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            futures = [
                pool.submit(
                    httpx.post,
                    f"{stack.base_url}/v1/chat/completions",
                    headers=keys[i % 4],
                    json=body,
                    timeout=600,
                )
                for i in range(20)
            ]
            return [f.result() for f in futures]

    responses, latencies = while_probing(stack.base_url, chats)
    assert [r.status_code for r in responses] == [200] * 20, [
        r.text for r in responses if r.status_code != 200
    ]
    answers = {r.json()["choices"][0]["message"]["content"] for r in responses}
    assert len(answers) == 1 and answers != {""}  # greedy: one engine, one answer
    assert max(latencies) < HEALTH_LIMIT_S, sorted(latencies)[-5:]
