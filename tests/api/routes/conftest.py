"""Fixtures the route tests share: a user's key and a training file of theirs."""

from __future__ import annotations

import pytest

from tests.api.conftest import CHAT_ROW, Service, jsonl


@pytest.fixture
def alice(service: Service) -> dict[str, str]:
    return service.new_key("alice")


@pytest.fixture
def training_file(service: Service, alice: dict[str, str]) -> str:
    return service.upload(alice, jsonl([CHAT_ROW], copies=20))["id"]
