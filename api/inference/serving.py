"""OpenAI chat completions and completions on the engine: request bodies in, response objects out.

The routes (`api/routes/inference.py`) only translate HTTP; this module turns a validated request
into one engine call and the engine's events into `chat.completion` / `text_completion` objects, or
for `stream: true` into server-sent `data:` lines ending in `data: [DONE]`. An error after the
stream started arrives as a chunk with an `error` object, which the `openai` SDK raises as
`APIError`. The engine is any `EngineClient`, so tests can drive this with a fake one.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydantic import BaseModel

from api import stopping
from api.errors import APIError
from api.inference.schemas import (
    ChatChoice,
    ChatChoiceMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    ChunkDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Usage,
)
from modulora.serve.events import DoneEvent, ErrorEvent, FinishEvent, GenerationEvent, TextEvent
from modulora.serve.protocol import EngineClient
from modulora.serve.types import EngineError, ModelSpec, Prompt, SamplingParams

_STATUS = {
    "context_length_exceeded": 400,
    "invalid_model": 400,
    "model_too_large": 400,
    "model_not_found": 404,
    "server_busy": 503,
    "server_stopping": 503,
}
STOP_POLL_S = 0.5
ChoiceEvent = TextEvent | FinishEvent


def _api_error(error: EngineError) -> APIError:
    status = _STATUS.get(error.code, 500)
    kind = "invalid_request_error" if status < 500 else "server_error"
    return APIError(status, error.message, type=kind, param=error.param, code=error.code)


class EngineCall:
    """One engine request seen from the event loop: its events land in an asyncio queue."""

    def __init__(self, engine: EngineClient, spec: ModelSpec, params: SamplingParams, prompt: Prompt) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        self.handle = engine.submit(
            spec, params, prompt, lambda event: loop.call_soon_threadsafe(self.queue.put_nowait, event)
        )

    async def events(self) -> AsyncIterator[GenerationEvent]:
        """The engine's events until Done or Error; an ErrorEvent if the server starts stopping."""
        try:
            while True:
                try:
                    event = await asyncio.wait_for(self.queue.get(), timeout=STOP_POLL_S)
                except TimeoutError:
                    if not stopping.is_stopping():
                        continue
                    event = ErrorEvent(
                        EngineError("The server is stopping; retry the request", "server_stopping")
                    )
                yield event
                if isinstance(event, DoneEvent | ErrorEvent):
                    return
        finally:
            self.handle.cancel()  # a no-op once done; frees the rows when the client went away

    async def collect(self, n: int) -> tuple[list[str], list[str | None], Usage]:
        texts, reasons = [""] * n, [None] * n
        async for event in self.events():
            if isinstance(event, TextEvent):
                texts[event.index] += event.text
            elif isinstance(event, FinishEvent):
                reasons[event.index] = event.finish_reason
            elif isinstance(event, ErrorEvent):
                raise _api_error(event.error)
            elif isinstance(event, DoneEvent):
                return texts, reasons, _usage(event)
        raise APIError(500, "generation ended without a result", type="server_error")


def _usage(done: DoneEvent) -> Usage:
    return Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                 total_tokens=done.prompt_tokens + done.completion_tokens)  # fmt: skip


def _sse(payload: BaseModel | dict[str, Any], exclude: set[str] | None = None) -> str:
    body = payload.model_dump_json(exclude=exclude) if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {body}\n\n"


async def _sse_lines(
    call: EngineCall, chunk: Callable[[ChoiceEvent | None], BaseModel], include_usage: bool
) -> AsyncIterator[str]:
    """`chunk(event)` per text/finish event, the usage chunk if asked, then [DONE]."""
    exclude = None if include_usage else {"usage"}
    async for event in call.events():
        if isinstance(event, ErrorEvent):
            yield _sse({"error": _api_error(event.error).body()["error"]})
            break
        if isinstance(event, DoneEvent):
            if include_usage:
                yield _sse(chunk(None).model_copy(update={"choices": [], "usage": _usage(event)}))
            break
        yield _sse(chunk(event), exclude)
    yield "data: [DONE]\n\n"


def chat_max_tokens(engine: EngineClient, body: ChatCompletionRequest) -> int:
    """The most tokens each choice may generate: the request's limit, else the context length."""
    return body.max_completion_tokens or body.max_tokens or engine.config.max_seq_len


def _chat_call(engine: EngineClient, spec: ModelSpec, body: ChatCompletionRequest) -> EngineCall:
    return EngineCall(engine, spec, body.sampling(chat_max_tokens(engine, body)), body.chat())


async def chat_completion(
    engine: EngineClient, spec: ModelSpec, body: ChatCompletionRequest
) -> ChatCompletion:
    """The whole answer to a conversation, once every choice has finished."""
    texts, reasons, usage = await _chat_call(engine, spec, body).collect(body.n)
    choices = [
        ChatChoice(index=i, message=ChatChoiceMessage(content=text), finish_reason=reason)
        for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))
    ]
    return ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model, choices=choices,
        usage=usage,
    )  # fmt: skip


def chat_completion_stream(
    engine: EngineClient, spec: ModelSpec, body: ChatCompletionRequest
) -> AsyncIterator[str]:
    """`chat.completion.chunk` lines as the engine generates (submitted now, read as they are sent)."""
    call = _chat_call(engine, spec, body)
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    started: set[int] = set()

    def chunk(event: ChoiceEvent | None) -> ChatCompletionChunk:
        choices = []
        if event is not None:
            # The first chunk of each choice carries the role, as OpenAI's do.
            role = "assistant" if event.index not in started else None
            started.add(event.index)
            if isinstance(event, TextEvent):
                choices = [ChunkChoice(index=event.index, delta=ChunkDelta(role=role, content=event.text))]
            else:
                choices = [ChunkChoice(index=event.index, delta=ChunkDelta(role=role),
                                       finish_reason=event.finish_reason)]  # fmt: skip
        return ChatCompletionChunk(id=completion_id, created=created, model=body.model, choices=choices)

    return _sse_lines(call, chunk, body.include_usage)


def _completion_call(engine: EngineClient, spec: ModelSpec, body: CompletionRequest) -> EngineCall:
    assert isinstance(body.prompt, str)  # the validator keeps exactly one prompt
    return EngineCall(engine, spec, body.sampling(body.max_tokens), body.prompt)


async def completion(engine: EngineClient, spec: ModelSpec, body: CompletionRequest) -> Completion:
    """The whole continuation of a raw prompt, once every choice has finished."""
    texts, reasons, usage = await _completion_call(engine, spec, body).collect(body.n)
    choices = [
        CompletionChoice(index=i, text=text, finish_reason=reason)
        for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))
    ]
    return Completion(
        id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model, choices=choices,
        usage=usage,
    )  # fmt: skip


def completion_stream(engine: EngineClient, spec: ModelSpec, body: CompletionRequest) -> AsyncIterator[str]:
    """`text_completion` chunk lines as the engine generates (submitted now, read as they are sent)."""
    call = _completion_call(engine, spec, body)
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(event: ChoiceEvent | None) -> Completion:
        choices = []
        if isinstance(event, TextEvent):
            choices = [CompletionChoice(index=event.index, text=event.text, finish_reason=None)]
        elif isinstance(event, FinishEvent):
            choices = [CompletionChoice(index=event.index, text="", finish_reason=event.finish_reason)]
        return Completion(id=completion_id, created=created, model=body.model, choices=choices)

    return _sse_lines(call, chunk, body.include_usage)
