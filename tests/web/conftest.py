"""The dashboard under test: a live API (uvicorn) and a real Celery worker in subprocesses, on a
fresh SQLite database, driven by headless Chromium through Playwright.

The storage root is the shared test home, so the converted SmolLM2 and its quantized bases are
reused across test runs. Jobs go to a queue named for this run, so a worker started by another
test session on the same Redis never takes them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
SCREENSHOTS = REPO / "docs" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
BASE_MODEL = "smollm2-135m-instruct"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_up() -> bool:
    try:
        with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=0.5):
            return True
    except OSError:
        return False


def _python(code: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise RuntimeError(f"set-up step failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip()


@dataclasses.dataclass
class Stack:
    url: str
    key: str
    env: dict[str, str]
    tmp: Path

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=60)

    def upload(self, path: Path) -> dict:
        with self.api() as client, path.open("rb") as f:
            response = client.post("/v1/files", files={"file": (path.name, f)}, data={"purpose": "fine-tune"})
        response.raise_for_status()
        return response.json()

    def wait_for_job(self, job_id: str, statuses: set[str], timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        with self.api() as client:
            while time.monotonic() < deadline:
                job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
                if job["status"] in statuses:
                    return job
                time.sleep(0.5)
        raise TimeoutError(f"job {job_id} did not reach {statuses} in {timeout_s}s; last: {job['status']}")


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        args, env=env, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    # Not under pytest's basetemp: concurrent pytest sessions prune each other's old basetemps,
    # which would pull the database out from under a running server.
    tmp = Path(tempfile.mkdtemp(prefix="modulora-web-"))
    port = _free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MODULORA_REDIS_URL", "REDIS_URL", "DATABASE_URL", "MODULORA_BROKER_URL", "BROKER_URL")
    }
    env.update(
        MODULORA_DATABASE_URL=f"sqlite:///{tmp / 'modulora.db'}",
        MODULORA_JOB_QUEUE=f"web-{uuid.uuid4().hex[:8]}",
        MODULORA_SSE_HEARTBEAT_S="1",
        MODULORA_PORT=str(port),
        PYTHONUNBUFFERED="1",
    )
    if _redis_up():
        env["MODULORA_REDIS_URL"] = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
    else:
        env["MODULORA_BROKER_URL"] = f"sqla+sqlite:///{tmp / 'broker.db'}"
    # Convert the built-in model once (shared home) so uploads get token statistics, then migrate.
    key = _python(
        "from modulora.models import resolve_model; resolve_model('smollm2-135m-instruct')\n"
        "from core.db import migrate; migrate.upgrade()\n"
        "from api import crud; from core.db.session import session_scope\n"
        "with session_scope() as s: print(crud.create_api_key(session=s, user_name='dashboard-test'))",
        env,
    ).splitlines()[-1]
    server = _start(
        [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)],
        env,
        tmp / "api.log",
    )
    worker = _start(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.celery_app:app",
            "worker",
            "--loglevel",
            "INFO",
            "-Q",
            env["MODULORA_JOB_QUEUE"],
            "-n",
            f"web-{port}@%h",
        ],
        env,
        tmp / "worker.log",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            raise RuntimeError(f"the API did not start:\n{(tmp / 'api.log').read_text()[-3000:]}")
        yield Stack(url=url, key=key, env=env, tmp=tmp)
    finally:
        _stop(worker)
        _stop(server)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    if not CHROMIUM.is_file():
        message = f"{CHROMIUM} is missing: apt-get install -y chromium"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@dataclasses.dataclass
class Dashboard:
    """One browser tab on the dashboard plus the few actions every test needs."""

    page: object
    stack: Stack

    def sign_in(self) -> None:
        self.page.fill("#api-key", self.stack.key)
        self.page.click("#sign-in button[type=submit]")
        self.page.wait_for_selector("#job-rows")

    def open(self, route: str) -> None:
        self.page.goto(f"{self.stack.url}/#/{route}")

    def screenshot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


@pytest.fixture
def dashboard(browser, stack: Stack) -> Iterator[Dashboard]:
    """A fresh tab (its own sessionStorage) that fails the test on any uncaught page error."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30_000)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    tab.goto(stack.url + "/")
    yield Dashboard(tab, stack)
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture(scope="session")
def chat_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 Alpaca rows from the shared datasets, as chat `messages` (the format the template shows)."""
    source = SHARED / "datasets" / "alpaca" / "alpaca_data_first5k.json"
    if not source.is_file():
        pytest.fail(f"the shared datasets are missing at {source}")
    rows = json.loads(source.read_text())[:16]
    path = tmp_path_factory.mktemp("data") / "alpaca-chat.jsonl"
    with path.open("w") as f:
        for row in rows:
            prompt = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": prompt},
                            {"role": "assistant", "content": row["output"]},
                        ]
                    }
                )
                + "\n"
            )
    return path


@pytest.fixture(scope="session")
def broken_dataset(tmp_path_factory: pytest.TempPathFactory, chat_dataset: Path) -> Path:
    """Two good rows, then a row cut off mid-JSON on line 3."""
    good = chat_dataset.read_text().splitlines()[:2]
    path = tmp_path_factory.mktemp("data") / "broken.jsonl"
    path.write_text("\n".join(good) + '\n{"messages": [{"role": "user", "content": "cut off"\n')
    return path
