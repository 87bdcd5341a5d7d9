"""An isolated service per test: its own storage root and SQLite database, migrated to head.

Enqueued job ids are collected instead of sent to a broker (the worker tests run real workers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.main import create_app
from core import tasks
from core.config import get_settings
from core.db import migrate
from core.db import session as db_session
from core.db.session import session_scope
from modulora.settings import get_settings as library_settings

CHAT_ROW = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


@dataclasses.dataclass
class Service:
    client: TestClient
    enqueued: list[str]
    home: Path

    def new_key(self, user: str, operator: bool | None = None) -> dict[str, str]:
        from api import crud

        with session_scope() as session:
            key = crud.create_api_key(session=session, user_name=user, operator=operator)
        return {"Authorization": f"Bearer {key}"}

    def upload(self, headers: dict[str, str], content: bytes, name: str = "train.jsonl") -> dict:
        response = self.client.post(
            "/v1/files", headers=headers, files={"file": (name, content)}, data={"purpose": "fine-tune"}
        )
        assert response.status_code == 200, response.text
        return response.json()


def clear_caches() -> None:
    get_settings.cache_clear()
    library_settings.cache_clear()
    db_session.get_db_engine.cache_clear()
    db_session._sessionmaker.cache_clear()


def jsonl(rows: list[dict], copies: int = 1) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows * copies).encode()


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    monkeypatch.setenv("MODULORA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MODULORA_DATABASE_URL", f"sqlite:///{tmp_path / 'modulora.db'}")
    for name in ("MODULORA_REDIS_URL", "REDIS_URL", "DATABASE_URL", "MODULORA_BROKER_URL", "BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MODULORA_SSE_HEARTBEAT_S", "0.2")
    clear_caches()
    migrate.upgrade()
    enqueued: list[str] = []
    monkeypatch.setattr(tasks, "enqueue_training", enqueued.append)
    with TestClient(create_app()) as client:
        yield Service(client, enqueued, tmp_path / "home")
    clear_caches()


@contextlib.contextmanager
def live_server(app: FastAPI) -> Iterator[str]:
    """`app` on a real uvicorn server in a thread (real sockets: disconnects, concurrency); its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the API did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
