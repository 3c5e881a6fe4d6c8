"""Line-numbered problems found in a data file.

Every problem reads ``FILE:LINE: field.path: what is wrong — how to fix it`` so
a user can jump to it. A file can hold hundreds of thousands of bad lines, so
only the first :data:`MAX_KEPT` messages are kept; the count stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_KEPT = 10_000


def format_problem(name: str, line: int | None, field_path: str | None, what: str, fix: str | None) -> str:
    """``FILE:LINE: field: what — fix`` (line, field and fix are left out when there is none)."""
    where = f"{name}:{line}" if line is not None else name
    text = f"{where}: {field_path}: {what}" if field_path else f"{where}: {what}"
    return f"{text} — {fix}" if fix else text


@dataclass
class Problems:
    """An append-only list of problem messages for one file, capped in memory, exact in count."""

    name: str
    messages: list[str] = field(default_factory=list)
    count: int = 0

    def add(self, line: int | None, field_path: str | None, what: str, fix: str | None = None) -> None:
        """Record one problem at ``line`` (``None`` for the whole file)."""
        self.count += 1
        if len(self.messages) < MAX_KEPT:
            self.messages.append(format_problem(self.name, line, field_path, what, fix))

    def at(self, line: int, prefix: str = "") -> "LineProblems":
        """A recorder bound to one record, whose field paths start with ``prefix``."""
        return LineProblems(self, line, prefix)

    def listed(self) -> list[str]:
        """The kept messages, plus a closing line saying how many were not kept."""
        hidden = self.count - len(self.messages)
        return self.messages + ([f"… and {hidden} more problems not listed"] if hidden > 0 else [])

    def __bool__(self) -> bool:
        return self.count > 0


@dataclass
class LineProblems:
    """Problems of one record: knows its line and the path prefix of its fields."""

    problems: Problems
    line: int
    prefix: str = ""
    count: int = 0

    def add(self, field_path: str | None, what: str, fix: str | None = None) -> None:
        """Record a problem in ``field_path`` of this record (``None``: the record itself)."""
        self.count += 1
        path = f"{self.prefix}{field_path}" if field_path else (self.prefix.rstrip(".") or None)
        self.problems.add(self.line, path, what, fix)


def describe_type(value) -> str:
    """A JSON-ish type name for messages: ``number``, ``array``, ``null``..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
