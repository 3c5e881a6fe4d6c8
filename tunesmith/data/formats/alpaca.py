"""Alpaca format: ``{"instruction": "…", "input": "…", "output": "…"}`` (optional ``system``).

The user turn is the instruction, followed by the input after a blank line when
there is one; the assistant turn is the output.
"""

from __future__ import annotations

from tunesmith.data.formats.base import Normalised, optional_string, required_string
from tunesmith.data.problems import LineProblems


class Alpaca:
    name = "alpaca"
    title = "Alpaca"
    example = '{"instruction": "…", "input": "…", "output": "…"}'

    def matches(self, record: dict) -> bool:
        return "instruction" in record or "output" in record

    def normalise(self, record: dict, issues: LineProblems) -> Normalised | None:
        before = issues.count
        instruction = required_string(record, "instruction", issues, allow_empty=False,
                                      fix='add "instruction": "…" (what the model is asked to do)')
        extra = optional_string(record, "input", issues)
        output = required_string(record, "output", issues, allow_empty=False,
                                 fix='add "output": "…" (the answer the model should learn)')
        system = optional_string(record, "system", issues)
        if issues.count > before:
            return None
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        messages = [{"role": "system", "content": system}] if system and system.strip() else []
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return Normalised(messages)
