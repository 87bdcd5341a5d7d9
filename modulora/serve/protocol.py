"""What a caller of the engine relies on: submit a request, receive its events, cancel it.

`InferenceEngine` is one; the HTTP API depends on this protocol only, so its tests can serve from a
fake engine, and nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from modulora.serve.types import EngineConfig, GenerationEvent, ModelSpec, SamplingParams


class RequestHandle(Protocol):
    def cancel(self) -> None:
        """Stop generating for this request (its client went away); a no-op once it is done."""


class EngineClient(Protocol):
    @property
    def config(self) -> EngineConfig: ...

    def submit(
        self,
        spec: ModelSpec,
        params: SamplingParams,
        on_event: Callable[[GenerationEvent], None],
        prompt: str | None = None,
        messages: list[dict[str, str]] | None = None,
    ) -> RequestHandle:
        """Queue a completion (`prompt`) or a chat completion (`messages`, exactly one of the two).

        `on_event` is called from the engine's thread with a `TextEvent` per new piece of text and a
        `FinishEvent` per choice, then one `DoneEvent`; or with one `ErrorEvent` instead.
        """
        ...
