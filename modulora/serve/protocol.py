"""What a caller of the engine relies on: submit a request, receive its events, cancel it.

`InferenceEngine` is one; the HTTP API depends on this protocol only, so its tests can serve from a
fake engine, and nothing here imports torch.
"""

from __future__ import annotations

from typing import Protocol

from modulora.serve.events import EventListener
from modulora.serve.types import EngineConfig, ModelSpec, Prompt, SamplingParams


class RequestHandle(Protocol):
    def cancel(self) -> None:
        """Stop generating for this request (its client went away); a no-op once it is done."""


class EngineClient(Protocol):
    @property
    def config(self) -> EngineConfig: ...

    def submit(
        self, spec: ModelSpec, params: SamplingParams, prompt: Prompt, on_event: EventListener
    ) -> RequestHandle:
        """Queue a completion (a text prompt) or a chat completion (a list of messages).

        `on_event` is called from the engine's thread with a `TextEvent` per new piece of text and a
        `FinishEvent` per choice, then one `DoneEvent`; or with one `ErrorEvent` instead.
        """
        ...
