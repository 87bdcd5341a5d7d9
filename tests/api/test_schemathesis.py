"""schemathesis against a live API, every phase (examples, coverage, fuzzing, stateful), every check,
with a key: 0 server errors and 0 failed checks. The engine is scripted, so no model loads.

The same run against a real server is in docs/service.md ("Checking the API against its schema").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.inference.service import get_inference_engine
from api.main import create_app
from core.config import get_settings
from modulora.serve.events import DoneEvent, FinishEvent, TextEvent
from tests.api.conftest import Service, live_server
from tests.api.engines import scripted_engine

SCHEMATHESIS = Path(sys.executable).parent / "st"
CONFIG = Path(__file__).with_name("schemathesis.toml")
MAX_EXAMPLES = 8
"""Examples per operation and phase: bounded so the run takes about a minute."""


@pytest.fixture
def live_api(service: Service, smollm2: Path) -> Iterator[str]:
    # The base model's config and tokenizer, as a prepared server has them (no weights: the engine
    # is scripted), so uploads are checked with its chat template and estimates use its shape.
    prepared = get_settings().models_dir / "smollm2-135m-instruct"
    prepared.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm2 / name).is_file():
            shutil.copy(smollm2 / name, prepared / name)
    app = create_app()
    engine = scripted_engine([TextEvent(0, "Hi"), FinishEvent(0, "stop"), DoneEvent(3, 1)])
    app.dependency_overrides[get_inference_engine] = lambda: engine
    with live_server(app) as url:
        yield url


def test_schemathesis_finds_no_server_error_and_no_failed_check(
    service: Service, live_api: str, tmp_path: Path
) -> None:
    key = service.new_key("fuzzer")["Authorization"]
    # A file and a job to find, so operations on ids reach their handlers, not only their 404s.
    file = service.upload({"Authorization": key}, b'{"messages": [{"role": "user", "content": "a"}, '
                          b'{"role": "assistant", "content": "b"}]}\n' * 12)  # fmt: skip
    assert httpx.get(f"{live_api}/health").status_code == 200
    command = [
        str(SCHEMATHESIS), "--config-file", str(CONFIG), "run", f"{live_api}/openapi.json",
        "--header", f"Authorization: {key}",
        "--phases", "examples,coverage,fuzzing,stateful",
        "--checks", "all",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", "1",
        "--workers", "1",
        "--request-timeout", "30",
        "--suppress-health-check", "all",
        "--no-color",
    ]  # fmt: skip
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "", "HOME": str(tmp_path)}
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    assert file["id"].startswith("file-")
