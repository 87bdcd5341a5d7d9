"""Alembic: upgrade to head and downgrade to base on SQLite and PostgreSQL; head matches the models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from core.db import migrate
from core.db.models import Base
from tests.utils.services import postgres_schema

TABLES = {"users", "api_keys", "files", "jobs", "events", "checkpoints", "models"}


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'migrations.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh schema in the `test` database, dropped afterwards (search_path points at it)."""
    with postgres_schema("mig") as url:
        yield url


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _diff_against_models(url: str) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return list(
                compare_metadata(
                    MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata
                )
            )
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_upgrade_then_downgrade_round_trips(backend: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue(f"{backend}_url")
    migrate.upgrade(url)
    assert _tables(url) == TABLES
    assert _diff_against_models(url) == []  # head is exactly the SQLAlchemy models
    migrate.downgrade(url)
    assert _tables(url) == set()
    migrate.upgrade(url)  # and back up again: downgrade left nothing behind
    assert _tables(url) == TABLES
