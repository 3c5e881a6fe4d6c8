"""/v1/chat/completions and /v1/completions

Generation runs in threads of its own (a capacity limiter apart from the one that
serves every other route): requests waiting for the model never take the threads
that answer listing and retrieving.
"""

from __future__ import annotations

from typing import AsyncIterator, Iterator

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from tunesmith.service.deps import CurrentProject
from tunesmith.service.schemas.chat import ChatCompletionCreate, CompletionCreate

router = APIRouter(prefix="/v1", tags=["completions"])

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_DONE = object()


async def _in_generation_thread(request: Request, fn, *args):
    return await anyio.to_thread.run_sync(fn, *args, limiter=request.app.state.inference_limiter)


async def _relay(request: Request, events: Iterator[str]) -> AsyncIterator[str]:
    """Hand a blocking event iterator to the client, one item per generation-thread call."""
    try:
        while (item := await _in_generation_thread(request, next, events, _DONE)) is not _DONE:
            yield item
    finally:  # the client went away or the stream ended: stop generating (even while being cancelled)
        with anyio.CancelScope(shield=True):
            await _in_generation_thread(request, events.close)


async def _answer(request: Request, stream: bool, make_stream, make_answer):
    if stream:
        events = await _in_generation_thread(request, make_stream)
        return StreamingResponse(_relay(request, events), media_type="text/event-stream", headers=SSE_HEADERS)
    return await _in_generation_thread(request, make_answer)


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionCreate, request: Request, project: CurrentProject):
    """Answer a conversation (``stream: true`` for server-sent events)."""
    inference = request.app.state.inference
    return await _answer(request, bool(body.stream), lambda: inference.chat_stream(project, body),
                         lambda: inference.chat(project, body))


@router.post("/completions")
async def completions(body: CompletionCreate, request: Request, project: CurrentProject):
    """Continue a raw prompt (legacy completions)."""
    inference = request.app.state.inference
    return await _answer(request, bool(body.stream), lambda: inference.complete_stream(project, body),
                         lambda: inference.complete(project, body))
