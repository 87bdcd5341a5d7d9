"""The API process's stop signal, for what runs longer than a request: live streams.

`modulora serve` sets it the moment SIGTERM or SIGINT arrives (before uvicorn waits for open
connections), so every open stream sends a final event and ends, and the process stops within
`shutdown_grace_s`. Long-lived loops check `is_stopping()` between waits of at most a second.
"""

from __future__ import annotations

import threading

_stopping = threading.Event()


def request_stop() -> None:
    _stopping.set()


def is_stopping() -> bool:
    return _stopping.is_set()
