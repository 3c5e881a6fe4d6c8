"""Incremental text from generated token ids, honouring stop strings.

Hand-written rather than transformers' ``TextIteratorStreamer`` because an
OpenAI-style stream must never show a stop string, nor the start of one that
may still complete, nor half a UTF-8 character; that needs the whole decoded
text at each step, not word-sized chunks.
"""

from __future__ import annotations

from typing import Callable

from transformers.generation.streamers import BaseStreamer

REPLACEMENT_CHAR = "\ufffd"  # what the tokenizer decodes an incomplete UTF-8 sequence to


def cut_at_stop(text: str, stops: list[str] | None) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    if not stops:
        return text, False
    positions = [text.find(s) for s in stops if s in text]
    if not positions:
        return text, False
    return text[: min(positions)], True


def _held_back(text: str, stops: list[str] | None) -> int:
    """How many trailing characters of ``text`` could still grow into a stop string."""
    longest = 0
    for stop in stops or []:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                longest = max(longest, size)
                break
    return longest


class DeltaStreamer(BaseStreamer):
    """A transformers streamer that calls ``on_delta`` with each new piece of safe text.

    Args:
        decode: token ids -> text (special tokens removed).
        on_delta: receives each text delta, in order.
        stops: stop strings; text from the first one on is never sent.
    """

    def __init__(self, decode: Callable[[list[int]], str], on_delta: Callable[[str], None],
                 stops: list[str] | None = None):
        self._decode = decode
        self._on_delta = on_delta
        self._stops = stops
        self._ids: list[int] = []
        self._sent = ""
        self._seen_prompt = False
        self.stopped = False

    def put(self, value) -> None:
        """Receive new token ids from ``generate`` (the first call carries the prompt)."""
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        if self.stopped:
            return
        self._ids.extend(int(t) for t in value.reshape(-1).tolist())
        text, hit = cut_at_stop(self._decode(self._ids), self._stops)
        if hit:
            self.stopped = True
            self._send(text)
            return
        safe = len(text) - _held_back(text, self._stops)
        while safe > 0 and text[safe - 1] == REPLACEMENT_CHAR:
            safe -= 1
        self._send(text[:safe])

    def end(self) -> None:
        """Called by ``generate`` when it finishes; the engine sends the final remainder itself."""

    def finish(self, final_text: str) -> None:
        """Send whatever of the final answer has not been sent yet."""
        self._send(final_text)

    def _send(self, text: str) -> None:
        # Decoding more ids can, rarely, rewrite earlier text; then wait until it settles.
        if len(text) > len(self._sent) and text.startswith(self._sent):
            delta = text[len(self._sent):]
            self._sent = text
            self._on_delta(delta)
