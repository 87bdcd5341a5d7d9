"""A live service for the worker tests: uvicorn and Celery workers as subprocesses, on Redis.

The server and workers share a fresh SQLite database and a private Celery queue (so other
workers on the same Redis never take these jobs), and the storage root of the test session, where
the real SmolLM2 is already converted. The job lease is 4 s so a killed worker's job is recovered
quickly.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.conftest import service  # noqa: F401 - the in-process service fixture, for unit tests here
from tests.utils.services import wait_for_health

REPO = Path(__file__).resolve().parents[2]
REDIS_URL = "redis://127.0.0.1:6379/0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class LiveService:
    base_url: str
    env: dict[str, str]
    logs: Path
    workers: list[subprocess.Popen[bytes]] = dataclasses.field(default_factory=list)

    def start_worker(self) -> subprocess.Popen[bytes]:
        name = f"w{len(self.workers)}-{uuid.uuid4().hex[:6]}@%h"
        log = open(self.logs / f"worker-{len(self.workers)}.log", "wb")  # noqa: SIM115 - lives with the process
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker", "-n", name],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.workers.append(worker)
        return worker

    def kill_workers(self) -> None:
        """SIGKILL every live worker and its pool child at once: nothing gets to clean up."""
        for worker in self.workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(timeout=30)

    def new_key(self, user: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "api.cli", "keys", "create", "--user", user],
            cwd=REPO,
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="package")
def live_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    tmp = tmp_path_factory.mktemp("live")
    try:
        import redis

        redis.Redis.from_url(REDIS_URL).ping()
    except Exception as e:  # noqa: BLE001 - reported as the failure reason
        pytest.fail(f"Redis at {REDIS_URL} is required for the worker tests: {e}")
    env = {
        **os.environ,
        "MODULORA_DATABASE_URL": f"sqlite:///{tmp / 'modulora.db'}",
        "MODULORA_REDIS_URL": REDIS_URL,
        "MODULORA_JOB_QUEUE": f"test-{uuid.uuid4().hex[:8]}",
        "MODULORA_JOB_LEASE_S": "4",
        "MODULORA_SSE_HEARTBEAT_S": "1",
        "PYTHONUNBUFFERED": "1",
    }
    port = _free_port()
    live = LiveService(f"http://127.0.0.1:{port}", env, tmp)
    live.new_key("setup")  # runs the migrations before the server starts
    server_log = open(tmp / "server.log", "wb")  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.main:app", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=server_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_for_health(live.base_url, tmp / "server.log")
    try:
        yield live
    finally:
        for process in [server, *live.workers]:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
