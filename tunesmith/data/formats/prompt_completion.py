"""Legacy OpenAI prompt/completion format: ``{"prompt": "…", "completion": "…"}``.

The completion-model fine-tuning format of OpenAI's davinci era. It becomes one
user turn (the prompt) and one assistant turn (the completion), exactly as
written: separators or leading spaces the user put in are kept.
"""

from __future__ import annotations

from tunesmith.data.formats.base import Normalised, required_string
from tunesmith.data.problems import LineProblems


class PromptCompletion:
    name = "prompt-completion"
    title = "prompt/completion"
    example = '{"prompt": "…", "completion": "…"}'

    def matches(self, record: dict) -> bool:
        return "prompt" in record or "completion" in record

    def normalise(self, record: dict, issues: LineProblems) -> Normalised | None:
        prompt = required_string(record, "prompt", issues, fix='add "prompt": "…" (the text the model is given)')
        completion = required_string(record, "completion", issues, allow_empty=False,
                                     fix='add "completion": "…" (the text the model should learn to write)')
        if prompt is None or completion is None:
            return None
        return Normalised([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])
