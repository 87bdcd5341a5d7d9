"""The dashboard under test: a live API (uvicorn) and a real Celery worker in subprocesses, on a
fresh SQLite database, driven by headless Chromium through Playwright.

The storage root is the shared test home, so the converted SmolLM2 and its quantized bases are
reused across test runs. Jobs go to a queue named for this run, so a worker started by another
test session on the same Redis never takes them. `fresh_stack` is a second API on an empty home,
as a new user's first server is. Every page a test visits is checked with axe-core (vendored in
web/vendor/axe-core) for accessibility violations.
"""

from __future__ import annotations

import contextlib
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

from tests.utils.services import wait_for_health

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
SCREENSHOTS = REPO / "docs" / "screenshots"
AXE = REPO / "web" / "vendor" / "axe-core" / "axe.min.js"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
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


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        args, env=env, cwd=REPO, stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True
    )


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclasses.dataclass
class Stack:
    url: str
    key: str
    env: dict[str, str]
    tmp: Path
    port: int
    server: subprocess.Popen | None = None

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=60)

    def upload(self, path: Path) -> dict:
        with self.api() as client, path.open("rb") as f:
            response = client.post("/v1/files", files={"file": (path.name, f)}, data={"purpose": "fine-tune"})
        response.raise_for_status()
        return response.json()

    def create_job(
        self, training_file: str, validation_file: str | None = None, **hyperparameters: object
    ) -> dict:
        """A job on the native GGUF base (no quantization step), small enough for a CPU."""
        body = {
            "model": BASE_MODEL,
            "training_file": training_file,
            "validation_file": validation_file,
            "suffix": hyperparameters.pop("suffix", None),
            "hyperparameters": {
                "quantization": "gguf",
                "bits": 4,
                "lora_r": 4,
                "batch_size": 2,
                "micro_batch_size": 2,
                "max_seq_len": 128,
                **hyperparameters,
            },
        }
        with self.api() as client:
            response = client.post("/v1/fine_tuning/jobs", json=body)
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

    def start_api(self) -> None:
        self.server = _start(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "api.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            self.env,
            self.tmp / "api.log",
        )
        wait_for_health(self.url, self.tmp / "api.log")

    def kill_api(self) -> None:
        """Stop the API at once, as a crash or a host restart would (the worker keeps training)."""
        assert self.server is not None
        self.server.kill()
        self.server.wait()
        self.server = None


def _service_env(tmp: Path, port: int, **extra: str) -> dict[str, str]:
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
        **extra,
    )
    if _redis_up():
        env["MODULORA_REDIS_URL"] = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
    else:
        env["MODULORA_BROKER_URL"] = f"sqla+sqlite:///{tmp / 'broker.db'}"
    return env


@contextlib.contextmanager
def _launch(env: dict[str, str], tmp: Path, port: int, setup: str, worker: bool) -> Iterator[Stack]:
    """Run `setup` (it prints an API key last), then the API and optionally a worker."""
    key = _python(
        setup + "from core.db import migrate; migrate.upgrade()\n"
        "from api import crud; from core.db.session import session_scope\n"
        "with session_scope() as s: print(crud.create_api_key(session=s, user_name='dashboard-test'))",
        env,
    ).splitlines()[-1]
    stack = Stack(url=f"http://127.0.0.1:{port}", key=key, env=env, tmp=tmp, port=port)
    processes = []
    try:
        if worker:
            processes.append(
                _start(
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
            )
        stack.start_api()
        yield stack
    finally:
        for process in processes + ([stack.server] if stack.server else []):
            _stop(process)


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    # Not under pytest's basetemp: concurrent pytest sessions prune each other's old basetemps,
    # which would pull the database out from under a running server.
    tmp = Path(tempfile.mkdtemp(prefix="modulora-web-"))
    port = _free_port()
    # Convert the built-in model once (shared home) so uploads get token statistics.
    setup = "from modulora.models import resolve_model; resolve_model('smollm2-135m-instruct')\n"
    try:
        with _launch(_service_env(tmp, port), tmp, port, setup, worker=True) as running:
            yield running
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def fresh_stack() -> Iterator[Stack]:
    """An API on an empty storage root: the base model has never been converted there."""
    tmp = Path(tempfile.mkdtemp(prefix="modulora-web-fresh-"))
    port = _free_port()
    env = _service_env(tmp, port, MODULORA_HOME=str(tmp / "home"))
    try:
        with _launch(env, tmp, port, "", worker=False) as running:
            yield running
    finally:
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


# The violations axe-core reports, each with its rule, impact and first offending elements.
_AXE_RUN = """async () => (await axe.run(document, {resultTypes: ["violations"]})).violations.map((v) => ({
  rule: v.id, impact: v.impact, help: v.help,
  nodes: v.nodes.slice(0, 3).map((n) => `${n.target.join(" ")}: ${n.failureSummary}`),
}))"""


@dataclasses.dataclass
class Dashboard:
    """Tabs on one stack's dashboard (one browser context, so the tabs share localStorage as a
    person's tabs do), plus the actions every test needs. Confirmation dialogs are accepted, but
    the next `dismiss_dialogs` ones; `dialogs` keeps what each one asked."""

    context: object
    stack: Stack
    errors: list[str]
    page: object = None
    dialogs: list[str] = dataclasses.field(default_factory=list)
    dismiss_dialogs: int = 0

    def __post_init__(self) -> None:
        self.page = self.new_tab()

    def new_tab(self) -> object:
        tab = self.context.new_page()
        tab.on("pageerror", lambda error: self.errors.append(str(error)))
        tab.on("dialog", self._answer)
        tab.goto(self.stack.url + "/")
        return tab

    def _answer(self, dialog: object) -> None:
        self.dialogs.append(dialog.message)
        if self.dismiss_dialogs:
            self.dismiss_dialogs -= 1
            dialog.dismiss()
        else:
            dialog.accept()

    def sign_in(self) -> None:
        self.page.fill("#api-key", self.stack.key)
        self.page.click("#sign-in button[type=submit]")
        self.page.wait_for_selector("#job-rows")

    def open(self, route: str, page: object = None) -> None:
        (page or self.page).goto(f"{self.stack.url}/#/{route}")

    def audit(self, page: object = None) -> None:
        """No accessibility violations (axe-core, every rule it runs by default) on the page as it is."""
        page = page or self.page
        if not page.evaluate("typeof window.axe !== 'undefined'"):
            # From the server, not inline: the dashboard's CSP allows only its own scripts.
            page.add_script_tag(url=f"{self.stack.url}/vendor/axe-core/{AXE.name}")
        violations = page.evaluate(_AXE_RUN)
        assert violations == [], f"axe-core on {page.url}:\n{json.dumps(violations, indent=1)}"

    def wait_until(self, expression: str, timeout: float = 30_000, page: object = None) -> None:
        """Poll a JavaScript expression until it is truthy (`timeout` in ms). Playwright's own
        `wait_for_function` compiles its predicate with eval, which the dashboard's Content Security
        Policy forbids; `evaluate` goes through the DevTools protocol, which the policy does not govern."""
        page = page or self.page
        deadline = time.monotonic() + timeout / 1000
        while not page.evaluate(f"Boolean({expression})"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} still false after {timeout / 1000:.0f} s")
            time.sleep(0.2)

    def overflow(self, page: object = None) -> dict[str, int]:
        return (page or self.page).evaluate(
            "({scrollWidth: document.documentElement.scrollWidth, viewport: window.innerWidth})"
        )

    def screenshot(self, name: str, page: object = None) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        (page or self.page).screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def _dashboard(browser: object, stack: Stack, **context_options: object) -> Iterator[Dashboard]:
    context = browser.new_context(**context_options)
    context.set_default_timeout(30_000)
    errors: list[str] = []
    yield Dashboard(context, stack, errors)
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture
def dashboard(browser, stack: Stack) -> Iterator[Dashboard]:
    """A fresh desktop browser (its own storage) that fails the test on any uncaught page error."""
    yield from _dashboard(browser, stack, viewport=DESKTOP)


@pytest.fixture
def fresh_dashboard(browser, fresh_stack: Stack) -> Iterator[Dashboard]:
    """A desktop browser on `fresh_stack`, the server that has never converted a model."""
    yield from _dashboard(browser, fresh_stack, viewport=DESKTOP)


@pytest.fixture
def phone(browser, stack: Stack) -> Iterator[Dashboard]:
    """The same at a phone's size: 390 x 844 CSS pixels, touch, mobile viewport rules."""
    yield from _dashboard(browser, stack, viewport=PHONE, is_mobile=True, has_touch=True)


def _alpaca_chat(tmp_path_factory: pytest.TempPathFactory, name: str, rows: slice) -> Path:
    """Alpaca rows from the shared datasets as chat `messages` (the format the template shows)."""
    source = SHARED / "datasets" / "alpaca" / "alpaca_data_first5k.json"
    if not source.is_file():
        pytest.fail(f"the shared datasets are missing at {source}")
    path = tmp_path_factory.mktemp("data") / name
    with path.open("w") as f:
        for row in json.loads(source.read_text())[rows]:
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
def chat_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 16 Alpaca rows, for training."""
    return _alpaca_chat(tmp_path_factory, "alpaca-chat.jsonl", slice(0, 16))


@pytest.fixture(scope="session")
def validation_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The next 2 Alpaca rows, held out for validation."""
    return _alpaca_chat(tmp_path_factory, "alpaca-chat-val.jsonl", slice(16, 18))


@pytest.fixture(scope="session")
def broken_dataset(tmp_path_factory: pytest.TempPathFactory, chat_dataset: Path) -> Path:
    """Two good rows, then a row cut off mid-JSON on line 3."""
    good = chat_dataset.read_text().splitlines()[:2]
    path = tmp_path_factory.mktemp("data") / "broken.jsonl"
    path.write_text("\n".join(good) + '\n{"messages": [{"role": "user", "content": "cut off"\n')
    return path
