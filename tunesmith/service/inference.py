"""Chat completions and legacy completions on base, fine-tuned and checkpoint models.

One :class:`tunesmith.infer.Engine` per server process: each base model is loaded
once and adapters attach to it on demand (the engine caches them), so many
fine-tuned models share one base in memory. Model names are resolved through
the catalogue only (never a path from the request).
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Iterator

from tunesmith.service import catalog
from tunesmith.service.context import ServiceContext
from tunesmith.service.errors import bad_request
from tunesmith.service.ids import new_id
from tunesmith.service.projects import Project
from tunesmith.service.schemas.chat import ChatCompletionCreate, CompletionCreate, SamplingFields

DEFAULT_MAX_TOKENS = 256
MAX_STOP_SEQUENCES = 4


class EngineHolder:
    """Creates the inference engine on first use (the API starts fast; training-only servers never load it)."""

    def __init__(self, device: str | None):
        self.device = device
        self._engine = None
        self._lock = threading.Lock()

    def get(self):
        """The shared engine."""
        with self._lock:
            if self._engine is None:
                from tunesmith.infer import Engine

                self._engine = Engine(device=self.device)
            return self._engine


def default_temperature() -> float:
    """Temperature when a request gives none: 0 (deterministic) unless TUNESMITH_DEFAULT_TEMPERATURE says otherwise."""
    raw = os.environ.get("TUNESMITH_DEFAULT_TEMPERATURE")
    return float(raw) if raw not in (None, "") else 0.0


def generation_settings(request: SamplingFields, max_tokens: int | None):
    """The engine's settings from a request; ``temperature=0`` stays 0 (only ``None`` takes a default).

    Raises:
        APIError: 400 for n > 1 or too many stop sequences; ConfigError (→ 400) for out-of-range values.
    """
    from tunesmith.infer.types import GenerationSettings

    if request.n is not None and request.n != 1:
        raise bad_request("Only n=1 is supported.", param="n")
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    if stop is not None and len(stop) > MAX_STOP_SEQUENCES:
        raise bad_request(f"stop takes at most {MAX_STOP_SEQUENCES} sequences.", param="stop")
    return GenerationSettings(
        max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        temperature=default_temperature() if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        stop=stop or None,
        seed=request.seed,
        ignore_eos=request.ignore_eos is True,  # vLLM's extension: generate exactly max_tokens
    )


def _text_of(content) -> str:
    """A message's text: a string, or the text parts of a list joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") not in ("text", "input_text"):
            raise bad_request(f"Message content of type {part.get('type')!r} is not supported; send text.",
                              param="messages")
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def plain_messages(request: ChatCompletionCreate) -> list[dict]:
    """OpenAI messages as the engine takes them (``developer`` is the newer name of ``system``)."""
    if not request.messages:
        raise bad_request("messages must not be empty.", param="messages")
    out = []
    for message in request.messages:
        role = "system" if message.role == "developer" else message.role
        item = {"role": role, "content": _text_of(message.content)}
        extra = message.model_extra or {}
        if extra.get("tool_calls"):
            item["tool_calls"] = extra["tool_calls"]
        out.append(item)
    return out


def _usage(completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens}


def _check_prompt(request: CompletionCreate) -> str:
    if isinstance(request.prompt, list):
        if len(request.prompt) != 1:
            raise bad_request("Send one prompt per request.", param="prompt")
        return request.prompt[0]
    if request.echo:
        raise bad_request("echo is not supported.", param="echo")
    if request.suffix:
        raise bad_request("suffix is not supported.", param="suffix")
    return request.prompt


class Inference:
    """The completions endpoints' logic."""

    def __init__(self, ctx: ServiceContext, holder: EngineHolder):
        self.ctx, self.holder = ctx, holder

    def _model(self, project: Project, name: str):
        found = catalog.resolve(self.ctx, project, name)
        engine = self.holder.get()
        return engine, engine.resolve(found.ref)

    # ----- chat
    def chat(self, project: Project, request: ChatCompletionCreate) -> dict:
        """A ``chat.completion`` object."""
        settings = generation_settings(request, _chat_max_tokens(request))
        messages = plain_messages(request)
        engine, handle = self._model(project, request.model)
        completion = engine.chat(handle, messages, settings)
        return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
                "model": request.model, "system_fingerprint": None, "service_tier": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text,
                                                     "refusal": None, "annotations": []},
                             "finish_reason": completion.finish_reason, "logprobs": None}],
                "usage": _usage(completion)}

    def chat_stream(self, project: Project, request: ChatCompletionCreate) -> Iterator[str]:
        """Server-sent events of ``chat.completion.chunk`` objects, ending with ``[DONE]``."""
        settings = generation_settings(request, _chat_max_tokens(request))
        messages = plain_messages(request)
        engine, handle = self._model(project, request.model)
        stream = engine.chat_stream(handle, messages, settings)
        chunk_id, created = new_id("chatcmpl"), int(time.time())

        def chunk(delta: dict | None, finish_reason=None) -> dict:
            choice = {"index": 0, "delta": {} if delta is None else delta, "finish_reason": finish_reason,
                      "logprobs": None}
            return {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": request.model,
                    "system_fingerprint": None, "choices": [choice]}

        return _sse_events(stream, lambda text: chunk({"content": text}),
                           lambda reason: chunk(None, reason), _with_usage(request),
                           opening=chunk({"role": "assistant", "content": "", "refusal": None}))

    # ----- legacy completions
    def complete(self, project: Project, request: CompletionCreate) -> dict:
        """A ``text_completion`` object."""
        prompt = _check_prompt(request)
        settings = generation_settings(request, 16 if request.max_tokens is None else request.max_tokens)
        engine, handle = self._model(project, request.model)
        completion = engine.complete(handle, prompt, settings)
        return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()),
                "model": request.model, "system_fingerprint": None,
                "choices": [{"text": completion.text, "index": 0, "logprobs": None,
                             "finish_reason": completion.finish_reason}],
                "usage": _usage(completion)}

    def complete_stream(self, project: Project, request: CompletionCreate) -> Iterator[str]:
        """Server-sent events of ``text_completion`` chunks, ending with ``[DONE]``."""
        prompt = _check_prompt(request)
        settings = generation_settings(request, 16 if request.max_tokens is None else request.max_tokens)
        engine, handle = self._model(project, request.model)
        stream = engine.complete_stream(handle, prompt, settings)
        chunk_id, created = new_id("cmpl"), int(time.time())

        def chunk(text: str, finish_reason=None) -> dict:
            return {"id": chunk_id, "object": "text_completion", "created": created, "model": request.model,
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}]}

        return _sse_events(stream, chunk, lambda reason: chunk("", reason), _with_usage(request))


def _with_usage(request: SamplingFields) -> bool:
    return bool(request.stream_options and request.stream_options.include_usage)


def _sse_events(stream, delta_chunk, finish_chunk, with_usage: bool, opening: dict | None = None) -> Iterator[str]:
    """The event stream of one streamed answer, whatever the chunk shape.

    The first token is generated before this returns (errors become HTTP errors, not a broken
    stream); then come ``opening`` (if any), one chunk per text delta, the finish chunk, the usage
    chunk when asked for (``choices: []``; the other chunks then carry ``usage: null``), and
    ``[DONE]``. Closing the events (the client went away) stops the generation.

    Args:
        stream: the engine's :class:`CompletionStream`.
        delta_chunk: text -> chunk body; finish_chunk: finish reason -> chunk body.
        with_usage: ``stream_options.include_usage`` was set.
        opening: a chunk sent before the first delta (chat's role chunk).
    """
    first = _first(stream)

    def body(chunk: dict, usage=None) -> str:
        if with_usage:
            chunk["usage"] = usage
        return _sse(chunk)

    def events() -> Iterator[str]:
        try:
            if opening is not None:
                yield body(opening)
            for delta in _chain(first, stream):
                yield body(delta_chunk(delta))
            completion = stream.completion
            yield body(finish_chunk(completion.finish_reason))
            if with_usage:
                yield body(dict(finish_chunk(None), choices=[]), usage=_usage(completion))
            yield "data: [DONE]\n\n"
        finally:
            stream.close()

    return events()


_END = object()


def _first(stream):
    """Start generating now, so errors (prompt too long, ...) become HTTP errors, not a broken stream."""
    try:
        return next(iter(stream))
    except StopIteration:
        return _END


def _chain(first, stream) -> Iterator[str]:
    if first is _END:
        return
    yield first
    yield from stream


def _chat_max_tokens(request: ChatCompletionCreate) -> int | None:
    if request.max_completion_tokens is not None and request.max_tokens is not None \
            and request.max_completion_tokens != request.max_tokens:
        raise bad_request("Give max_completion_tokens or max_tokens, not both.", param="max_completion_tokens")
    return request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
