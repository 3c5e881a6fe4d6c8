"""The registry of training-data formats.

Each format is one module with one class (see :class:`~tunesmith.data.formats.base.Format`);
adding a format is adding its module and one entry to :data:`FORMATS`. Detection
asks each format in order whether a record is its own, so the more specific
shapes come first.
"""

from __future__ import annotations

from tunesmith.data.formats.alpaca import Alpaca
from tunesmith.data.formats.base import Format, Normalised
from tunesmith.data.formats.openai_chat import OpenAIChat
from tunesmith.data.formats.prompt_completion import PromptCompletion
from tunesmith.data.formats.sharegpt import ShareGPT

FORMATS: list[Format] = [OpenAIChat(), ShareGPT(), Alpaca(), PromptCompletion()]


def detect(record: dict) -> Format | None:
    """The first registered format that recognises ``record``, or None."""
    for fmt in FORMATS:
        if fmt.matches(record):
            return fmt
    return None


def by_name(name: str) -> Format:
    """The registered format called ``name``."""
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise KeyError(name)


def unknown_record_fix() -> str:
    """The hint for a record no format recognises: one example of each."""
    return "use one of: " + "; ".join(f"{fmt.title} {fmt.example}" for fmt in FORMATS)


__all__ = ["FORMATS", "Format", "Normalised", "by_name", "detect", "unknown_record_fix"]
