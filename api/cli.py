"""`modulora serve`, `modulora keys create`: registered on the `modulora` command through the
entry-point group `modulora.cli` (the library's CLI never imports `api`). `modulora worker` is the
worker's own (`worker/cli.py`); `serve --with-worker` starts it as a process, `python -m worker`."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from typing import Any

from core.bases import base_model_problem
from core.config import get_settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from core.db import migrate

    settings = get_settings()
    migrate.upgrade()
    worker = None
    if args.with_worker:
        worker = subprocess.Popen([sys.executable, "-m", "worker"])
    url = f"http://{args.host}:{args.port}"
    print(f"ModuLoRA API on {url} (dashboard at {url}/, OpenAPI at {url}/docs)")
    print(f"Database: {settings.resolved_database_url}; broker: {settings.resolved_broker_url}")
    print("Create an API key with: modulora keys create --user NAME")
    for name, source in settings.base_models.items():
        problem = base_model_problem(name)
        print(
            f"Base model {name!r}: {source}" + (f" (not usable on this host: {problem})" if problem else "")
        )
    try:
        uvicorn.run("api.main:app", host=args.host, port=args.port, log_level="info")
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
    return 0


def _keys_create(args: argparse.Namespace) -> int:
    from api import crud
    from core.db import migrate
    from core.db.session import session_scope

    migrate.upgrade()
    with session_scope() as session:
        print(crud.create_api_key(session=session, user_name=args.user))
    return 0


def register_serve(subparsers: Any) -> None:
    settings = get_settings()
    parser = subparsers.add_parser("serve", help="run the REST API (migrates the database first)")
    parser.add_argument("--host", default=settings.host)
    parser.add_argument("--port", type=int, default=settings.port)
    parser.add_argument("--with-worker", action="store_true", help="also start one training worker")
    parser.set_defaults(func=_serve)


def register_keys(subparsers: Any) -> None:
    parser = subparsers.add_parser("keys", help="manage API keys")
    keys = parser.add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="create a key for a user (the user is created if new)")
    create.add_argument("--user", required=True)
    create.set_defaults(func=_keys_create)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m api.cli ...`) for when the library's CLI is not installed."""
    parser = argparse.ArgumentParser(prog="modulora")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for register in (register_serve, register_keys):
        register(subparsers)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
