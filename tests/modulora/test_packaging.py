"""`pip install modulora` is the library alone: it imports, and its command builds, without the
packages of the `service` extra (FastAPI, SQLAlchemy, Celery, ...)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVICE_PACKAGES = (
    "fastapi", "starlette", "uvicorn", "multipart", "python_multipart", "sqlalchemy", "alembic",
    "celery", "kombu", "redis", "psycopg", "prometheus_client",
)  # fmt: skip

# Run in a fresh interpreter: a finder ahead of all others refuses the service packages, then every
# module of the library is imported and the `modulora` parser is built (it loads the service's
# subcommands through entry points, which must not need the service packages to register).
SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    BLOCKED = set(sys.argv[1:])

    class RefuseService(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"{name} is a service package", name=name)
            return None

    sys.meta_path.insert(0, RefuseService())
    import modulora, gpu_kernels

    names = ["gpu_kernels." + m.name for m in pkgutil.walk_packages(gpu_kernels.__path__)]
    names += [m.name for m in pkgutil.walk_packages(modulora.__path__, "modulora.")]
    for name in names:
        importlib.import_module(name)
    from modulora.cli import build_parser

    build_parser().parse_args(["quantize", "--model", "m", "--method", "rtn", "--out", "o"])
    leaked = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
    assert not leaked, leaked
    print(len(names), "modules")
    """
)


def run_without_service(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script, *SERVICE_PACKAGES],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_library_imports_without_the_service_packages() -> None:
    result = run_without_service(SCRIPT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-2]) > 20  # every module was walked, not an empty package


def test_the_blocker_refuses_a_service_import() -> None:
    """The check above can fail: the same set-up refuses `core.db`, which needs SQLAlchemy."""
    result = run_without_service(SCRIPT.replace("import modulora, gpu_kernels", "import core.db.session"))
    assert result.returncode != 0
    assert "sqlalchemy is a service package" in result.stderr
