"""What a request emits, from the engine's thread: text and finish per choice, then done or an error.

Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from modulora.serve.types import EngineError, FinishReason


@dataclasses.dataclass
class TextEvent:
    """New text of choice `index` (may be empty when a token completes no character yet)."""

    index: int
    text: str


@dataclasses.dataclass
class FinishEvent:
    index: int
    finish_reason: FinishReason


@dataclasses.dataclass
class DoneEvent:
    """The request is over: every choice has finished. Token counts for `usage`."""

    prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass
class ErrorEvent:
    error: EngineError


GenerationEvent = TextEvent | FinishEvent | DoneEvent | ErrorEvent
EventListener = Callable[[GenerationEvent], None]
