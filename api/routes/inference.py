"""/v1/chat/completions and /v1/completions: OpenAI-compatible generation from bases and adapters.

`model` is a base model name or a fine-tuned model id (`GET /v1/models`); the engine keeps each
base resident once and applies the adapter per row, so a newly finished job is servable at once.
With `stream: true` the answer is server-sent `chat.completion.chunk` (or `text_completion`)
objects ending in `data: [DONE]`. These routes translate HTTP only: `api.inference.serving` turns
a request into an engine call and its events into the response.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Annotated, TypeVar

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from api import limits
from api.deps import CurrentUser
from api.errors import APIError, error_responses
from api.inference import serving
from api.inference.schemas import ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest
from api.inference.service import get_inference_engine, model_spec_for
from core.db.session import session_scope
from modulora.serve.protocol import EngineClient
from modulora.serve.types import ModelSpec

T = TypeVar("T")

router = APIRouter(prefix="/v1", tags=["inference"])
EngineDep = Annotated[EngineClient, Depends(get_inference_engine)]
DISCONNECT_POLL_S = 0.5


def _spec(user_id: str, model_id: str) -> ModelSpec:
    # A short session of its own: generation can take minutes and must hold no connection.
    with session_scope() as session:
        return model_spec_for(session=session, user_id=user_id, model_id=model_id)


def _event_stream(lines: AsyncIterator[str], lease: limits.Lease) -> StreamingResponse:
    async def released() -> AsyncIterator[str]:
        try:
            async for line in lines:
                yield line
        finally:  # the stream ended, failed, or the client went away (Starlette cancels it)
            lease.release()

    return StreamingResponse(
        released(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def _answer(request: Request, work: Awaitable[T], lease: limits.Lease) -> T:
    """`work` (a whole, non-streamed answer), cancelled if the client disconnects first: cancelling
    it cancels the engine request, so an abandoned `n=16` answer stops taking decode steps."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                raise APIError(499, "The client closed the request", code="client_closed_request")
        return task.result()
    finally:
        task.cancel()  # a no-op once done
        lease.release()


@router.post("/chat/completions", response_model=ChatCompletion, responses=error_responses(404, 429, 503))
async def create_chat_completion(
    request: Request, body: ChatCompletionRequest, user: CurrentUser, engine: EngineDep
) -> ChatCompletion | StreamingResponse:
    """Answer a conversation with a base model or one of your fine-tuned models.

    The messages are rendered with the chat template the adapter was trained with (else the base's);
    without `max_tokens` or `max_completion_tokens` the answer may run to the end of the context.
    Each user has a limit on requests and on `n` x `max_tokens` in flight (429 with Retry-After).
    """
    spec = await anyio.to_thread.run_sync(_spec, user.id, body.model)
    lease = limits.admit(user.id, body.n * serving.chat_max_tokens(engine, body))
    if body.stream:
        return _event_stream(serving.chat_completion_stream(engine, spec, body), lease)
    return await _answer(request, serving.chat_completion(engine, spec, body), lease)


@router.post("/completions", response_model=Completion, responses=error_responses(404, 429, 503))
async def create_completion(
    request: Request, body: CompletionRequest, user: CurrentUser, engine: EngineDep
) -> Completion | StreamingResponse:
    """Continue a raw prompt (no chat template) with a base model or one of your fine-tuned models;
    `max_tokens` defaults to 16, as OpenAI's."""
    spec = await anyio.to_thread.run_sync(_spec, user.id, body.model)
    lease = limits.admit(user.id, body.n * body.max_tokens)
    if body.stream:
        return _event_stream(serving.completion_stream(engine, spec, body), lease)
    return await _answer(request, serving.completion(engine, spec, body), lease)
