"""Chat completions and legacy completions: requests and the objects they return."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict


class ChatMessage(BaseModel):
    """One message; ``content`` may be a string or a list of text parts."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict[str, Any]], None] = None


class StreamOptions(BaseModel):
    """``stream_options``."""

    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = None


class SamplingFields(BaseModel):
    """Generation fields shared by both endpoints (``None`` means "not given", never "0")."""

    # Fields OpenAI accepts that do not change tunesmith's answer (user, logit_bias, ...) are ignored.
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None  # vLLM's extension: generate up to max_tokens past the end of turn


class ChatCompletionCreate(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


class CompletionCreate(SamplingFields):
    """``POST /v1/completions`` (legacy): a raw prompt, no chat template."""

    prompt: Union[str, list[str]]
    echo: bool | None = None
    suffix: str | None = None


class Usage(BaseModel):
    """Token counts."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
