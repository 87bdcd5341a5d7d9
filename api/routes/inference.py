"""/v1/chat/completions and /v1/completions: OpenAI-compatible generation from bases and adapters.

`model` is a base model name or a fine-tuned model id (`GET /v1/models`); the engine keeps each
base resident once and applies the adapter per row, so a newly finished job is servable at once.
With `stream: true` the answer is server-sent `chat.completion.chunk` (or `text_completion`)
objects ending in `data: [DONE]`; an error after the stream started arrives as a chunk with an
`error` object, which the `openai` SDK raises as `APIError`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from api.deps import CurrentUser, SessionDep
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
from api.inference.service import get_engine, resolve_model
from modulora.serve.types import (
    DoneEvent,
    EngineError,
    ErrorEvent,
    Event,
    FinishEvent,
    ModelSpec,
    SamplingParams,
    TextEvent,
)

router = APIRouter(prefix="/v1", tags=["inference"])
EngineDep = Annotated[Any, Depends(get_engine)]  # an InferenceEngine; typed Any so torch stays unimported

_STATUS = {"context_length_exceeded": 400, "model_not_found": 404, "server_busy": 503}


def _api_error(error: EngineError) -> APIError:
    status = _STATUS.get(error.code, 500)
    kind = "invalid_request_error" if status < 500 else "server_error"
    return APIError(status, error.message, type=kind, param=error.param, code=error.code)


class _Generation:
    """One engine request seen from the event loop: engine events land in an asyncio queue."""

    def __init__(self, engine: Any, spec: ModelSpec, params: SamplingParams, **prompt: Any) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.request = engine.submit(
            spec, params, lambda event: loop.call_soon_threadsafe(self.queue.put_nowait, event), **prompt
        )

    async def events(self) -> AsyncIterator[Event]:
        try:
            while True:
                event = await self.queue.get()
                yield event
                if isinstance(event, DoneEvent | ErrorEvent):
                    return
        finally:
            self.request.cancel()  # a no-op once done; frees the rows when the client went away

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


async def _stream(generation: _Generation, chunk: Any, include_usage: bool) -> AsyncIterator[str]:
    """SSE lines: `chunk(event)` per text/finish event, the usage chunk if asked, then [DONE]."""
    exclude = None if include_usage else {"usage"}
    async for event in generation.events():
        if isinstance(event, ErrorEvent):
            yield _sse({"error": _api_error(event.error).body()["error"]})
            break
        if isinstance(event, DoneEvent):
            if include_usage:
                yield _sse(chunk(None).model_copy(update={"choices": [], "usage": _usage(event)}))
            break
        yield _sse(chunk(event), exclude)
    yield "data: [DONE]\n\n"


def _stream_response(lines: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(lines, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.post("/chat/completions", response_model=ChatCompletion)
async def create_chat_completion(
    body: ChatCompletionRequest, user: CurrentUser, session: SessionDep, engine: EngineDep
) -> ChatCompletion | StreamingResponse:
    """Answer a conversation with a base model or one of your fine-tuned models."""
    spec = resolve_model(session=session, user_id=user.id, model_id=body.model)
    max_tokens = body.max_completion_tokens or body.max_tokens or engine.config.max_seq_len
    generation = _Generation(engine, spec, body.sampling(max_tokens), messages=body.chat())
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    if body.stream:
        started: set[int] = set()

        def chunk(event: Event | None) -> ChatCompletionChunk:
            choices = []
            if isinstance(event, TextEvent | FinishEvent):
                # The first chunk of each choice carries the role, as OpenAI's do.
                role = "assistant" if event.index not in started else None
                started.add(event.index)
                if isinstance(event, TextEvent):
                    choices = [
                        ChunkChoice(index=event.index, delta=ChunkDelta(role=role, content=event.text))
                    ]
                else:
                    choices = [ChunkChoice(index=event.index, delta=ChunkDelta(role=role),
                                           finish_reason=event.finish_reason)]  # fmt: skip
            return ChatCompletionChunk(id=completion_id, created=created, model=body.model, choices=choices)

        return _stream_response(_stream(generation, chunk, body.include_usage))

    texts, reasons, usage = await generation.collect(body.n)
    choices = [
        ChatChoice(index=i, message=ChatChoiceMessage(content=text), finish_reason=reason)
        for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))
    ]
    return ChatCompletion(id=completion_id, created=created, model=body.model, choices=choices, usage=usage)


@router.post("/completions", response_model=Completion)
async def create_completion(
    body: CompletionRequest, user: CurrentUser, session: SessionDep, engine: EngineDep
) -> Completion | StreamingResponse:
    """Continue a raw prompt (no chat template) with a base model or one of your fine-tuned models."""
    spec = resolve_model(session=session, user_id=user.id, model_id=body.model)
    assert isinstance(body.prompt, str)  # the validator keeps exactly one prompt
    generation = _Generation(engine, spec, body.sampling(body.max_tokens), prompt=body.prompt)
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    if body.stream:

        def chunk(event: Event | None) -> Completion:
            choices = []
            if isinstance(event, TextEvent):
                choices = [CompletionChoice(index=event.index, text=event.text, finish_reason=None)]
            elif isinstance(event, FinishEvent):
                choices = [CompletionChoice(index=event.index, text="", finish_reason=event.finish_reason)]
            return Completion(id=completion_id, created=created, model=body.model, choices=choices)

        return _stream_response(_stream(generation, chunk, body.include_usage))

    texts, reasons, usage = await generation.collect(body.n)
    choices = [
        CompletionChoice(index=i, text=text, finish_reason=reason)
        for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))
    ]
    return Completion(id=completion_id, created=created, model=body.model, choices=choices, usage=usage)
