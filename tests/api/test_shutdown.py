"""Stopping and starting the API: SIGTERM ends open streams with a final event and the process
within `shutdown_grace_s` (5 s); a start removes uploads a dead API left half-written."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from api import stopping
from api.inference.service import get_inference_engine
from core.config import get_settings
from tests.api.conftest import CHAT_ROW, Service, jsonl
from tests.api.engines import hanging_engine

GRACE_S = 5.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_ends_open_streams_with_a_final_event_within_five_seconds(tmp_path: Path) -> None:
    home, port = tmp_path / "home", _free_port()
    env = {
        **os.environ,
        "MODULORA_HOME": str(home),
        "MODULORA_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
    }
    for name in ("MODULORA_REDIS_URL", "REDIS_URL", "DATABASE_URL", "MODULORA_BROKER_URL", "BROKER_URL"):
        env.pop(name, None)
    # Left by an API that was killed mid-upload (its pid is gone), and one of a live upload.
    files = home / "files"
    files.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = files / f".tmp-{socket.gethostname()}-{dead.pid}-abc"
    live = files / f".tmp-{socket.gethostname()}-{os.getpid()}-def"
    for path in (leftover, live):
        path.write_bytes(b"x" * 1000)
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "the API did not start"
            time.sleep(0.2)
        assert not leftover.exists() and live.exists()
        key = subprocess.run(
            [sys.executable, "-m", "api.cli", "keys", "create", "--user", "ann"],
            env=env, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        headers = {"Authorization": f"Bearer {key}"}
        upload = {"file": ("t.jsonl", jsonl([CHAT_ROW], 10))}
        form = {"purpose": "fine-tune"}
        file = httpx.post(f"{url}/v1/files", headers=headers, files=upload, data=form).json()
        body = {"model": "smollm2-135m-instruct", "training_file": file["id"]}
        job = httpx.post(f"{url}/v1/fine_tuning/jobs", headers=headers, json=body).json()
        received: list[str] = []

        def listen() -> None:
            with httpx.stream("GET", f"{url}/v1/fine_tuning/jobs/{job['id']}/metrics/stream", headers=headers,
                              timeout=30) as response:  # fmt: skip
                received.extend(response.iter_lines())

        streams = [threading.Thread(target=listen) for _ in range(3)]
        for stream in streams:
            stream.start()
        time.sleep(1.0)
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        took = time.monotonic() - started
        for stream in streams:
            stream.join(timeout=5)
        assert took < GRACE_S, f"stopping took {took:.1f} s"
        assert received.count("event: stopping") == 3, received
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()


@pytest.fixture
def stop_signal() -> object:
    yield stopping.request_stop
    stopping._stopping.clear()


def test_a_streamed_chat_gets_an_error_chunk_and_done_when_the_server_stops(
    service: Service, monkeypatch: pytest.MonkeyPatch, stop_signal
) -> None:  # noqa: ANN001
    monkeypatch.setenv("MODULORA_BASE_MODELS", '["tiny"]')
    get_settings.cache_clear()
    engine = hanging_engine()
    service.client.app.dependency_overrides[get_inference_engine] = lambda: engine
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    with service.client.stream(
        "POST", "/v1/chat/completions", json=body, headers=service.new_key("a")
    ) as response:
        lines = response.iter_lines()
        assert '"content":"Hel"' in next(line for line in lines if line)
        stop_signal()
        rest = [line for line in lines if line]
    assert '"code": "server_stopping"' in rest[0] and rest[-1] == "data: [DONE]"
    assert engine.wait_cancelled(1)
