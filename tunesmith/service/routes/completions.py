"""/v1/chat/completions and /v1/completions"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from tunesmith.service.deps import CurrentProject
from tunesmith.service.schemas.chat import ChatCompletionCreate, CompletionCreate

router = APIRouter(prefix="/v1", tags=["completions"])

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.post("/chat/completions")
def chat_completions(body: ChatCompletionCreate, request: Request, project: CurrentProject):
    """Answer a conversation (``stream: true`` for server-sent events)."""
    inference = request.app.state.inference
    if body.stream:
        return StreamingResponse(inference.chat_stream(project, body), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    return inference.chat(project, body)


@router.post("/completions")
def completions(body: CompletionCreate, request: Request, project: CurrentProject):
    """Continue a raw prompt (legacy completions)."""
    inference = request.app.state.inference
    if body.stream:
        return StreamingResponse(inference.complete_stream(project, body), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    return inference.complete(project, body)
