"""Plain values the engine takes and returns: generation settings and a completion."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tunesmith.errors import ConfigError

FinishReason = Literal["stop", "length"]


@dataclass
class GenerationSettings:
    """How to generate.

    Attributes:
        max_tokens: the most new tokens to generate.
        temperature: 0 means greedy decoding (kept as 0, never replaced by a default).
        top_p: nucleus sampling mass, used only when temperature > 0.
        stop: strings that end the answer; the answer is cut before the first one.
        seed: makes sampling reproducible when temperature > 0.
        ignore_eos: keep generating past the end-of-turn token, up to max_tokens (benchmarks).
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems, "fix the generation settings")

    def problems(self) -> list[str]:
        """Every invalid setting, as messages naming the field."""
        found = []
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            found.append(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 5:
            found.append(f"temperature must be between 0 and 5, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            found.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.ignore_eos, bool):
            found.append(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if self.stop is not None:
            if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
                found.append("stop must be a list of non-empty strings")
        return found

    @property
    def greedy(self) -> bool:
        """Greedy decoding: temperature 0."""
        return self.temperature == 0


@dataclass
class Completion:
    """One generated answer and what it cost.

    Attributes:
        text: the generated text (without the end-of-turn token or a stop string).
        prompt_tokens: tokens in the prompt the model read.
        completion_tokens: tokens the model generated (the end-of-turn token included).
        finish_reason: "stop" (end of turn or a stop string) or "length" (max_tokens reached).
        latency_s: wall time from the request to the last token.
        token_ids: the generated token ids.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    latency_s: float
    token_ids: list[int] = field(default_factory=list, repr=False)

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens
