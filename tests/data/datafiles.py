"""Builders of small data files for the data-layer tests."""

from __future__ import annotations


def chat_record(i: int, system: str | None = "Answer briefly.") -> dict:
    """A valid OpenAI chat example, distinct for each ``i``."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages += [{"role": "user", "content": f"What is {i} plus {i}?"},
                 {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]
    return {"messages": messages}


def good_records(n: int = 12) -> list[dict]:
    return [chat_record(i) for i in range(n)]
