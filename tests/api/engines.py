"""Stand-ins for the inference engine behind the API's `EngineClient` protocol, for route tests:
each records its requests and answers them on a thread of its own, as the engine's loop does."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

from modulora.serve.events import DoneEvent, FinishEvent, GenerationEvent, TextEvent
from modulora.serve.types import EngineConfig, ModelSpec, Prompt, SamplingParams

OnEvent = Callable[[GenerationEvent], None]


@dataclasses.dataclass
class FakeEngine:
    """Answers each request by calling `answer(on_event)` on a new thread; counts cancellations."""

    answer: Callable[[OnEvent], None]
    config: EngineConfig = dataclasses.field(default_factory=lambda: EngineConfig(max_seq_len=64))
    submitted: list[tuple[ModelSpec, SamplingParams, Prompt]] = dataclasses.field(default_factory=list)
    cancels: int = 0
    _cancelled: threading.Semaphore = dataclasses.field(default_factory=lambda: threading.Semaphore(0))

    def submit(
        self, spec: ModelSpec, params: SamplingParams, prompt: Prompt, on_event: OnEvent
    ) -> FakeEngine:
        self.submitted.append((spec, params, prompt))
        threading.Thread(target=self.answer, args=(on_event,)).start()
        return self

    def cancel(self) -> None:
        self.cancels += 1
        self._cancelled.release()

    def wait_cancelled(self, count: int, timeout: float = 5.0) -> bool:
        return all(self._cancelled.acquire(timeout=timeout) for _ in range(count))


def scripted_engine(events: list[GenerationEvent]) -> FakeEngine:
    """Every request is answered with `events`."""

    def answer(on_event: OnEvent) -> None:
        for event in events:
            on_event(event)

    return FakeEngine(answer)


def held_engine(release: threading.Event) -> FakeEngine:
    """Every request is answered "Hi" once `release` is set."""

    def answer(on_event: OnEvent) -> None:
        release.wait()
        for event in (TextEvent(0, "Hi"), FinishEvent(0, "stop"), DoneEvent(1, 1)):
            on_event(event)

    return FakeEngine(answer)


def hanging_engine() -> FakeEngine:
    """Every request sends one text event and then never finishes until it is cancelled."""
    return FakeEngine(lambda on_event: on_event(TextEvent(0, "Hel")))
