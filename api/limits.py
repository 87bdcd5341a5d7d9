"""Per-user limits on inference: requests in flight and `n` x `max_tokens` in flight, per API process.

Over a limit is a 429 with `Retry-After` (the openai SDK waits that long and retries); a single
request larger than the whole token allowance is a 400 naming `max_tokens`, since no wait helps.
The counts live in this process: with several API replicas each enforces its own.
"""

from __future__ import annotations

import threading
from collections import Counter

from api.errors import APIError, bad_request
from core.config import get_settings

RETRY_AFTER_S = 1
"""Inference requests take seconds; a client retrying after one finds its earlier ones done."""

_lock = threading.Lock()
_requests: Counter[str] = Counter()
_tokens: Counter[str] = Counter()


class Lease:
    """One admitted request's share of its user's limits, until `release()` (idempotent)."""

    def __init__(self, user_id: str, tokens: int) -> None:
        self.user_id, self.tokens, self._released = user_id, tokens, False

    def release(self) -> None:
        with _lock:
            if self._released:
                return
            self._released = True
            _requests[self.user_id] -= 1
            _tokens[self.user_id] -= self.tokens
            if _requests[self.user_id] <= 0:
                del _requests[self.user_id], _tokens[self.user_id]


def admit(user_id: str, tokens: int) -> Lease:
    """Admit a request that may generate `tokens` tokens (n x max_tokens), or raise 429/400."""
    settings = get_settings()
    if tokens > settings.user_max_tokens_in_flight:
        raise bad_request(
            f"n x max_tokens = {tokens} is over the per-user limit of {settings.user_max_tokens_in_flight} "
            "tokens in flight; lower max_tokens or n",
            param="max_tokens",
            code="token_limit_exceeded",
        )
    with _lock:
        if _requests[user_id] >= settings.user_max_concurrent_requests:
            limit = settings.user_max_concurrent_requests
            reason = f"{_requests[user_id]} requests in flight (the limit is {limit})"
        elif _tokens[user_id] + tokens > settings.user_max_tokens_in_flight:
            reason = (
                f"{_tokens[user_id]} tokens in flight, {tokens} more asked "
                f"(the limit is {settings.user_max_tokens_in_flight})"
            )
        else:
            _requests[user_id] += 1
            _tokens[user_id] += tokens
            return Lease(user_id, tokens)
    raise APIError(
        429,
        f"Rate limit reached: {reason}; retry after {RETRY_AFTER_S} s",
        type="requests",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )
