"""The service as deployed, for the fault and load suite: PostgreSQL (a fresh schema of the `test`
database) and Redis, the API (`modulora serve`, restartable) and Celery workers as subprocesses
that the tests kill. Jobs run on a private queue with a 4 s lease, so a killed worker's job is
recovered within seconds. The storage root is the test session's, where SmolLM2 is converted."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.utils.services import postgres_schema, wait_for_health
from tests.worker.conftest import REDIS_URL, LiveService, _free_port

REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class FaultStack(LiveService):
    api: subprocess.Popen[bytes] | None = None

    def start_api(self) -> None:
        log = open(self.logs / "api.log", "ab")  # noqa: SIM115 - lives with the process
        port = self.base_url.rsplit(":", 1)[1]
        self.api = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "serve", "--port", port],
            cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        wait_for_health(self.base_url, self.logs / "api.log")

    def kill_api(self) -> None:
        assert self.api is not None
        os.killpg(self.api.pid, signal.SIGKILL)
        self.api.wait(timeout=30)

    def stop(self) -> None:
        for process in [self.api, *self.workers]:
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="package")
def postgres_url() -> Iterator[str]:
    with postgres_schema("faults") as url:
        yield url


@pytest.fixture(scope="package")
def stack(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStack]:
    try:
        import redis

        redis.Redis.from_url(REDIS_URL).ping()
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"Redis at {REDIS_URL} is required for the fault suite: {e}")
    tmp = tmp_path_factory.mktemp("faults")
    env = {
        **os.environ,
        "MODULORA_DATABASE_URL": postgres_url,
        "MODULORA_REDIS_URL": REDIS_URL,
        "MODULORA_JOB_QUEUE": f"faults-{uuid.uuid4().hex[:8]}",
        "MODULORA_JOB_LEASE_S": "4",
        "MODULORA_SSE_HEARTBEAT_S": "1",
        "MODULORA_INFERENCE_MAX_SEQ_LEN": "256",
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("DATABASE_URL", "REDIS_URL", "BROKER_URL", "MODULORA_BROKER_URL"):
        env.pop(name, None)
    stack = FaultStack(f"http://127.0.0.1:{_free_port()}", env, tmp)
    stack.new_key("setup")  # migrates before the API starts
    stack.start_api()
    try:
        yield stack
    finally:
        stack.stop()
