"""docker-compose.yml: api, GPU worker, Redis and PostgreSQL share one configuration and volume;
`docker-compose config` accepts it where the tool is installed (CI installs it)."""

from __future__ import annotations

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
