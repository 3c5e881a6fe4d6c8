"""What a training-data format is, and the field checks formats share.

A format recognises its records by their keys and turns one record into
OpenAI chat messages (the one shape the rest of tunesmith knows), reporting
every problem of the record with its field path. Normalised messages are
plain dicts: ``role``, ``content`` (a string), and where they apply ``weight``
(0|1, assistant), ``tool_calls`` (assistant), ``tool_call_id`` / ``name`` (tool).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

from tunesmith.data.problems import LineProblems, describe_type


@dataclass
class Normalised:
    """One record as chat messages, with the function schemas it offers (if any)."""

    messages: list[dict]
    tools: list[dict] | None = None


class Format(Protocol):
    """A training-data format. Add one by writing a module with a class like this and registering it."""

    name: str      # machine name: "openai-chat"
    title: str     # shown to users: "OpenAI chat"
    example: str   # a one-line example record, for hints

    def matches(self, record: dict) -> bool:
        """Whether ``record`` is in this format (decided by its keys)."""

    def normalise(self, record: dict, issues: LineProblems) -> Normalised | None:
        """The record as chat messages; ``None`` when it has problems (all added to ``issues``)."""


def text_content(value, path: str, issues: LineProblems) -> str | None:
    """A message's text: a string, or a list of ``{"type": "text", "text": …}`` parts joined.

    Returns None (after adding a problem) for anything else.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
                continue
            kind = part.get("type") if isinstance(part, dict) else None
            if kind is not None and kind != "text":
                issues.add(f"{path}[{i}].type", f'unsupported content part type "{kind}"',
                           'only text parts ({"type": "text", "text": "…"}) can be trained on')
            else:
                issues.add(f"{path}[{i}]", f"content part is {describe_type(part)}, not a text part",
                           'use {"type": "text", "text": "…"}')
            return None
        return "".join(texts)
    issues.add(path, f"must be a string, got {describe_type(value)}",
               'write it as a string (or a list of {"type": "text", "text": "…"} parts)')
    return None


def check_weight(value, path: str, issues: LineProblems) -> int | None:
    """A message weight: 0 or 1 (not true/false, not 0.5)."""
    if isinstance(value, bool) or value not in (0, 1):
        shown = json.dumps(value) if isinstance(value, (str, int, float, bool)) or value is None else describe_type(value)
        issues.add(path, f"weight must be 0 or 1, got {shown}",
                   "use 1 to train on this assistant message, 0 to skip it")
        return None
    return int(value)


def required_string(record: dict, key: str, issues: LineProblems, *, allow_empty: bool = True,
                    fix: str | None = None) -> str | None:
    """``record[key]`` when it is a string (non-empty unless ``allow_empty``), else a problem."""
    if key not in record or record[key] is None:
        issues.add(key, "missing", fix or f'add "{key}": "…"')
        return None
    value = record[key]
    if not isinstance(value, str):
        issues.add(key, f"must be a string, got {describe_type(value)}", fix or f'write "{key}" as a string')
        return None
    if not allow_empty and not value.strip():
        issues.add(key, "is empty", fix or f'give "{key}" some text')
        return None
    return value


def optional_string(record: dict, key: str, issues: LineProblems) -> str | None:
    """``record[key]`` if present and a string; absent or null gives None; other types are a problem."""
    value = record.get(key)
    if value is None or isinstance(value, str):
        return value
    issues.add(key, f"must be a string, got {describe_type(value)}", f'write "{key}" as a string or leave it out')
    return None
