"""`modulora serve`, `modulora keys create|list|revoke`: registered on the `modulora` command through the
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
    config = uvicorn.Config(
        "api.main:app",
        host=args.host,
        port=args.port,
        log_level="info",
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s) - 1),
    )
    try:
        _stopping_server(config).run()
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
    return 0


def _stopping_server(config: Any) -> Any:
    """uvicorn's server, telling the app's streams to end the moment a stop signal arrives (uvicorn
    itself would wait for them, and open event streams never end on their own)."""
    import uvicorn

    from api import stopping

    class StoppingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            stopping.request_stop()
            super().handle_exit(sig, frame)

    return StoppingServer(config)


def _keys_create(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from api import crud
    from core.db import migrate
    from core.db.models import utcnow
    from core.db.session import session_scope

    migrate.upgrade()
    expires_at = utcnow() + timedelta(days=args.expires_in_days) if args.expires_in_days else None
    with session_scope() as session:
        print(
            crud.create_api_key(
                session=session,
                user_name=args.user,
                name=args.name,
                expires_at=expires_at,
                operator=True if args.operator else None,
            )
        )
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from core.db import migrate
    from core.db.models import ApiKey, User
    from core.db.session import session_scope

    migrate.upgrade()
    stmt = select(ApiKey, User).join(User, User.id == ApiKey.user_id).order_by(ApiKey.pk)
    if args.user:
        stmt = stmt.where(User.name == args.user)
    with session_scope() as session:
        for key, user in session.execute(stmt).all():
            state = (
                "revoked"
                if key.revoked_at
                else f"expires {key.expires_at:%Y-%m-%d}"
                if key.expires_at
                else "active"
            )
            role = " (operator)" if user.is_operator else ""
            print(f"{key.public_id}  {key.prefix}…  {user.name}{role}  {key.name or '-'}  {state}")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from core.db import migrate
    from core.db.models import ApiKey, utcnow
    from core.db.session import session_scope

    migrate.upgrade()
    with session_scope() as session:
        key = session.scalar(select(ApiKey).where(ApiKey.public_id == args.key_id))
        if key is None:
            print(f"no key with id {args.key_id!r}", file=sys.stderr)
            return 1
        key.revoked_at = key.revoked_at or utcnow()
    print(f"revoked {args.key_id}")
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
    create.add_argument("--name", help="a label shown in key lists")
    create.add_argument("--expires-in-days", type=int, help="the key stops working after this many days")
    create.add_argument(
        "--operator", action="store_true", help="the user may read /metrics (all users' counts)"
    )
    create.set_defaults(func=_keys_create)
    listing = keys.add_parser("list", help="every key (id, prefix, user, state); never the secrets")
    listing.add_argument("--user", help="only this user's keys")
    listing.set_defaults(func=_keys_list)
    revoke = keys.add_parser("revoke", help="revoke a key by its id (from `keys list`); effective at once")
    revoke.add_argument("key_id")
    revoke.set_defaults(func=_keys_revoke)


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
