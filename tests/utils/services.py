"""What the tests that start real processes or use the real PostgreSQL share: waiting for an API to
answer, and a fresh PostgreSQL schema per test or suite."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def wait_for_health(base_url: str, log: Path, timeout_s: float = 60) -> None:
    """Return once `GET /health` answers 200; fail the test with the end of the server's log otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    pytest.fail(f"the API did not start:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def postgres_schema(prefix: str) -> Iterator[str]:
    """A URL whose search_path is a fresh schema of the `test` database, dropped afterwards."""
    from sqlalchemy import create_engine, text

    schema = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f"CREATE SCHEMA {schema}"))
    except Exception as e:  # noqa: BLE001 - the reason is the failure message
        pytest.fail(f"PostgreSQL at 127.0.0.1:5432 (database 'test') is required: {e}")
    try:
        yield f"{POSTGRES}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()
