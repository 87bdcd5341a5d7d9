"""Per-user limits on inference (429 + Retry-After, 400 for a request no wait can admit) and
abandoned requests cancelled in the engine, streamed or not, on a live server (real disconnects)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from api.inference.service import get_inference_engine
from api.main import create_app
from core.config import get_settings
from tests.api.conftest import Service, live_server
from tests.api.engines import FakeEngine, hanging_engine

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100}


@pytest.fixture
def hanging(service: Service, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, FakeEngine, dict]]:
    monkeypatch.setenv("MODULORA_BASE_MODELS", '["tiny"]')
    monkeypatch.setenv("MODULORA_USER_MAX_CONCURRENT_REQUESTS", "2")
    monkeypatch.setenv("MODULORA_USER_MAX_TOKENS_IN_FLIGHT", "1000")
    get_settings.cache_clear()
    engine = hanging_engine()
    app = create_app()
    app.dependency_overrides[get_inference_engine] = lambda: engine
    with live_server(app) as url:
        yield url, engine, service.new_key("ada")


def test_requests_over_the_concurrency_limit_get_429_with_retry_after(hanging) -> None:  # noqa: ANN001
    url, engine, key = hanging
    with httpx.Client(base_url=url, headers=key, timeout=10) as client:
        streams = [
            client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) for _ in range(2)
        ]
        for stream in streams:
            assert stream.__enter__().status_code == 200
        over = client.post("/v1/chat/completions", json=CHAT)
        assert over.status_code == 429, over.text
        assert over.headers["retry-after"] == "1"
        assert over.json()["error"]["code"] == "rate_limit_exceeded"
        other_user = client.post(
            "/v1/chat/completions", json={**CHAT, "stream": True}, headers={"Authorization": "Bearer nope"}
        )
        assert other_user.status_code == 401
        for stream in streams:
            stream.__exit__(None, None, None)
        assert engine.wait_cancelled(2)
        # Both leases are back: a new request is admitted (and then abandoned).
        with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as again:
            assert again.status_code == 200
        assert engine.wait_cancelled(1)


def test_tokens_in_flight_are_limited_too(hanging) -> None:  # noqa: ANN001
    url, engine, key = hanging
    with httpx.Client(base_url=url, headers=key, timeout=10) as client:
        with client.stream("POST", "/v1/chat/completions", json={**CHAT, "n": 8, "stream": True}) as first:
            assert first.status_code == 200  # 8 x 100 of the 1000 tokens
            over = client.post("/v1/chat/completions", json={**CHAT, "n": 3})
            assert over.status_code == 429 and over.headers["retry-after"] == "1"
        too_big = client.post("/v1/chat/completions", json={**CHAT, "n": 11})
        assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "max_tokens"


def test_abandoned_non_streaming_request_is_cancelled_in_the_engine(hanging) -> None:  # noqa: ANN001
    url, engine, key = hanging
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "n": 4}, headers=key, timeout=1.0)
    assert engine.wait_cancelled(1), "the engine request outlived its client"
    assert time.monotonic() - started < 5
    with httpx.stream(
        "POST", f"{url}/v1/completions", json={"model": "tiny", "prompt": "x", "stream": True}, headers=key
    ) as stream:
        assert stream.status_code == 200 and next(stream.iter_lines()).startswith("data: ")
    assert engine.wait_cancelled(1), "the streamed engine request outlived its client"
