"""docker-compose.yml and the Dockerfile: api, GPU worker, Redis and PostgreSQL share one
configuration and volume; the api has a GPU for inference and the user's models read-only;
`docker-compose config` accepts it where the tool is installed (CI installs it). The image itself
is built and run on a GPU host (docs/service.md, "Docker"); here its Dockerfile is read."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def test_compose_file_wires_api_worker_redis_postgres() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"api", "worker", "redis", "postgres"}
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["DATABASE_URL"].startswith("postgresql://") and env["REDIS_URL"] == "redis://redis:6379/0"
        assert "artifacts:/data" in services[name]["volumes"]
    assert services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert services["api"]["command"][:2] == ["modulora", "serve"]
    assert services["worker"]["command"][:2] == ["modulora", "worker"]


def _compose_command() -> list[str]:
    if tool := shutil.which("docker-compose"):
        return [tool]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    raise AssertionError("docker-compose is not installed: apt-get install docker-compose")


def test_docker_compose_config_accepts_the_file() -> None:
    command = [*_compose_command(), "config", "--quiet"]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=120)


def _resolved_compose(**env: str) -> dict:
    """The file as `docker-compose config` resolves it, with `env` set."""
    command = [*_compose_command(), "config"]
    result = subprocess.run(
        command, cwd=REPO, check=True, capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )
    return yaml.safe_load(result.stdout)


def test_api_gets_a_gpu_a_memory_budget_and_the_models_read_only() -> None:
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    api = services["api"]
    assert api["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert int(api["environment"]["MODULORA_INFERENCE_MEMORY_BUDGET_BYTES"].split(":-")[1].rstrip("}")) > 0
    for name in ("api", "worker"):
        models = [v for v in services[name]["volumes"] if v.split(":")[-2:] == ["/models", "ro"]]
        assert len(models) == 1, services[name]["volumes"]


def test_base_models_named_in_the_environment_resolve_to_the_read_only_mount() -> None:
    sources = {"llama-2-7b": "/models/llama-2-7b", "smollm2-135m-instruct": "smollm2-135m-instruct"}
    resolved = _resolved_compose(MODULORA_BASE_MODELS=json.dumps(sources), MODULORA_MODELS_DIR="/srv/models")
    for name in ("api", "worker"):
        service = resolved["services"][name]
        assert json.loads(service["environment"]["MODULORA_BASE_MODELS"]) == sources
        assert "/srv/models:/models:ro" in service["volumes"]


def test_dockerfile_has_a_c_compiler_and_a_pinned_cuda_torch() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.MULTILINE)
    assert base is not None
    # Triton builds its launcher with gcc at first use: a slim image needs it installed.
    assert "-slim" not in base.group(1) or re.search(r"apt-get install[^\n]*build-essential", dockerfile)
    version = re.search(r"^ARG TORCH_VERSION=(\d+\.\d+\.\d+)$", dockerfile, re.MULTILINE)
    index = re.search(
        r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/(cu\d+)$", dockerfile, re.MULTILINE
    )
    assert version and index, "torch must be pinned to a version and a CUDA index"
    assert 'pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"' in dockerfile
    # The driver the CUDA build needs is written down where users look.
    assert re.search(r"driver[^\n]*>= ?570", (REPO / "docs" / "service.md").read_text())
