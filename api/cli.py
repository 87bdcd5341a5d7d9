"""`modulora serve`, `modulora worker`, `modulora keys create`: registered on the `modulora`
command through the entry-point group `modulora.cli` (the library's CLI never imports `api`)."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from typing import Any

from modulora.settings import get_settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from api.db import migrate

    settings = get_settings()
    migrate.upgrade()
    worker = None
    if args.with_worker:
        worker = subprocess.Popen([sys.executable, "-m", "api.cli", "worker"])
    url = f"http://{args.host}:{args.port}"
    print(f"ModuLoRA API on {url} (dashboard at {url}/, OpenAPI at {url}/docs)")
    print(f"Database: {settings.resolved_database_url}; broker: {settings.resolved_broker_url}")
    print("Create an API key with: modulora keys create --user NAME")
    try:
        uvicorn.run("api.main:app", host=args.host, port=args.port, log_level="info")
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
    return 0


def run_worker(hostname: str | None = None, loglevel: str = "INFO") -> None:
    from worker.celery_app import app

    settings = get_settings()
    argv = ["worker", f"--loglevel={loglevel}", "-Q", settings.job_queue, "--concurrency=1"]
    app.worker_main(argv + (["--hostname", hostname] if hostname else []))


def _worker(args: argparse.Namespace) -> int:
    run_worker(args.hostname, args.loglevel)
    return 0


def _keys_create(args: argparse.Namespace) -> int:
    from api import crud
    from api.db import migrate
    from api.db.session import session_scope

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


def register_worker(subparsers: Any) -> None:
    parser = subparsers.add_parser("worker", help="run a training worker (one per GPU: CUDA_VISIBLE_DEVICES)")
    parser.add_argument("-n", "--hostname", help="worker name, unique per GPU, e.g. gpu0@%%h")
    parser.add_argument("--loglevel", default="INFO")
    parser.set_defaults(func=_worker)


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
    for register in (register_serve, register_worker, register_keys):
        register(subparsers)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
