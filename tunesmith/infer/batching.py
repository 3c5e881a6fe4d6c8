"""Continuous batching: one thread per loaded model runs every request's decoding in one forward per step.

transformers' ``generate`` decodes one fixed batch from start to end, so requests
that arrive while it runs wait for all of it, and a batch of eight needs all eight
at once. The scheduler here owns the model instead: a request's prompt is read
(prefilled) in a forward of its own as soon as it arrives, and its cache is merged
into the running batch at the next step boundary; every step then decodes ONE
token for all active rows in one forward pass with a KV cache, and a row leaves
the batch as soon as it stops (end of turn, max_tokens, a stop string, or its
client went away), so short answers never wait for long ones.

The running batch is left-padded: row ``i`` holds its tokens in the last columns
of the cache, the attention mask hides the padding columns, and each row passes
its own position ids. Merging pads the shorter cache on the left and concatenates
along the batch; leaving rows are dropped with ``index_select`` and the columns
that became padding for every row are trimmed away. Prompts are prefilled one by
one so that no padded query ever runs (a fully masked attention row is NaN) and
each row's numbers are those of ``generate`` on that prompt alone.

Each row decodes with its own settings: greedy, or temperature/top_p sampling
(with its own ``torch.Generator`` when it has a seed). Rows can be kept in an
order of the caller's (``row_order``): the engine keeps the rows of one adapter
side by side, in the order of the stacked adapters, so that batched LoRA takes
them as they are instead of lining them up again in every layer of every step.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from tunesmith.infer.kv_cache import appending_cache
from tunesmith.infer.types import GenerationSettings

MAX_ROWS = 32  # rows decoded together; later arrivals wait for a free row

_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """End every scheduler thread before the interpreter exits (a thread killed inside torch aborts the process)."""
    for scheduler in list(_LIVE):
        scheduler.close(abandon=True)


@dataclass
class GenerationRequest:
    """One prompt to continue, and (once ``done`` is set) what was generated.

    Attributes:
        prompt: the prompt's token ids.
        adapter: the peft adapter name, or None for the base model.
        settings: max_tokens, temperature, top_p, stop strings, seed.
        eos_ids: ids that end the answer (kept in the output, as ``generate`` does).
        decode: token ids -> text (for stop strings).
        on_token: called with each new token id, in the scheduler's thread.
        cancel: set to stop generating (the client went away).
        tokens: the generated ids.
        error: the exception that ended this request, if one did.
    """

    prompt: list[int]
    adapter: str | None
    settings: GenerationSettings
    eos_ids: frozenset[int]
    decode: Callable[[list[int]], str]
    on_token: Callable[[int], None] | None = None
    cancel: threading.Event | None = None
    tokens: list[int] = field(default_factory=list)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def cancelled(self) -> bool:
        """The caller asked to stop."""
        return self.cancel is not None and self.cancel.is_set()


class _Row:
    """A request in the running batch: its next position, its sampler and its stop test."""

    def __init__(self, request: GenerationRequest):
        self.request = request
        self.position = len(request.prompt)  # position id of the next token fed back
        settings = request.settings
        self.generator = None
        if not settings.greedy and settings.seed is not None:
            self.generator = torch.Generator().manual_seed(int(settings.seed))
        stops = settings.stop or []
        self.window = max((len(s) for s in stops), default=0) + 8

    @property
    def last(self) -> int:
        return self.request.tokens[-1]

    def accept(self, token: int) -> bool:
        """Record ``token``; True when the row is finished.

        Stop strings are matched on text, not tokens (transformers' ``stop_strings`` matches at
        the token level and can stop before the string is complete). Only the last few tokens
        are decoded: each carries at least one character of text, so a window of the longest
        stop's length (plus slack for special tokens) suffices.
        """
        request = self.request
        request.tokens.append(token)
        if request.on_token is not None:
            request.on_token(token)
        if token in request.eos_ids or len(request.tokens) >= request.settings.max_tokens:
            return True
        stops = request.settings.stop
        if stops:
            tail = request.decode(request.tokens[-self.window:])
            if any(stop in tail for stop in stops):
                return True
        return request.cancelled()


class Scheduler:
    """Runs requests on one model in a continuously batched decode loop (a thread of its own).

    Args:
        forward: ``forward(input_ids, attention_mask, position_ids, cache, adapters) -> last logits``;
            runs the model under its lock with each row's adapter (see the engine).
        device: where the model lives.
        name: the thread's name.
        max_rows: the most rows decoded together.
        row_order: ``row_order(adapter) -> key``: rows that join are sorted by it (stable);
            None keeps the order of arrival.
    """

    def __init__(self, forward: Callable, device: torch.device, name: str = "tunesmith-batch",
                 max_rows: int = MAX_ROWS, row_order: Callable[[str | None], int] | None = None):
        self._forward = forward
        self._row_order = row_order
        self.device = device
        self.max_rows = max_rows
        self._pending: collections.deque[GenerationRequest] = collections.deque()
        self._cond = threading.Condition()
        self._rows: list[_Row] = []
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._closed = False
        self._abandon = False
        self.peak_rows = 0  # the most rows decoded together so far
        self._held = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        _LIVE.add(self)

    # ----- callers' side

    def generate(self, request: GenerationRequest) -> GenerationRequest:
        """Queue ``request`` and wait until it is finished.

        Raises:
            whatever the model raised while running this request.
        """
        self.submit(request)
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request

    def submit(self, request: GenerationRequest) -> None:
        """Queue ``request``; it joins the running batch at the next step boundary."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self._pending.append(request)
            self._cond.notify()

    def close(self, abandon: bool = False) -> None:
        """Stop the loop once the rows in flight are finished (requests still queued are refused).

        Args:
            abandon: fail the rows in flight at the next step instead of finishing them (process exit).
        """
        with self._cond:
            self._closed = True
            self._abandon = self._abandon or abandon
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=60)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Within: no new request joins the batch; on leaving, all those queued meanwhile join at once."""
        with self._cond:
            self._held += 1
        try:
            yield
        finally:
            with self._cond:
                self._held -= 1
                self._cond.notify()

    @property
    def active_rows(self) -> int:
        """Rows being decoded now."""
        return len(self._rows)

    @property
    def queued(self) -> int:
        """Requests waiting to join the batch."""
        with self._cond:
            return len(self._pending)

    # ----- the loop

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._rows and (self._held or not self._pending):
                    self._cond.wait()
                if self._closed and (self._abandon or not self._rows):
                    refused = list(self._pending) + [row.request for row in self._rows]
                    self._pending.clear()
                    self._rows, self._cache, self._mask = [], None, None
                    break
                room = 0 if self._held else self.max_rows - len(self._rows)
                arrivals = [self._pending.popleft() for _ in range(min(len(self._pending), room))]
            joining = [prefilled for request in arrivals if (prefilled := self._admit(request)) is not None]
            if joining:
                self._merge(joining)
            if self._rows:
                self._step_all()
        for request in refused:
            _finish(request, RuntimeError("the engine was closed"))

    def _admit(self, request: GenerationRequest) -> tuple[_Row, object] | None:
        """Prefill ``request``'s prompt alone and choose its first token.

        Returns:
            the new row and its cache, to merge into the batch; None when the request already ended.
        """
        if request.cancelled():
            _finish(request)
            return None
        self.peak_rows = max(self.peak_rows, len(self._rows) + 1)
        try:
            ids = torch.tensor([request.prompt], dtype=torch.long, device=self.device)
            cache = appending_cache()
            positions = torch.arange(ids.shape[1], device=self.device).unsqueeze(0)
            logits = self._forward(ids, torch.ones_like(ids), positions, cache, [request.adapter])
            row = _Row(request)
            finished = row.accept(_choose(logits, [row])[0])
        except BaseException as exc:  # this request fails; the batch goes on
            _finish(request, exc)
            return None
        if finished:
            _finish(request)
            return None
        self._rows.append(row)  # counted now; its cache joins in _merge before the next step
        return row, cache

    def _merge(self, joining: list[tuple[_Row, object]]) -> None:
        """Add prefilled rows' caches: pad every cache on the left to one width, concatenate along the batch.

        The rows themselves were appended to ``_rows`` by :meth:`_admit`, in this order.
        """
        caches = [cache for _, cache in joining]
        masks = [torch.ones(1, c.get_seq_length(), dtype=torch.long, device=self.device) for c in caches]
        if self._cache is not None:
            caches.insert(0, self._cache)
            masks.insert(0, self._mask)
        width = max(m.shape[1] for m in masks)
        if len(caches) > 1:
            for layers in zip(*(c.layers for c in caches)):
                layers[0].keys = torch.cat([_pad_left(layer.keys, width, -2) for layer in layers])
                layers[0].values = torch.cat([_pad_left(layer.values, width, -2) for layer in layers])
        self._cache = caches[0]
        self._mask = torch.cat([_pad_left(m, width, 1) for m in masks])
        if self._row_order is not None:
            keys = [self._row_order(row.request.adapter) for row in self._rows]
            order = sorted(range(len(keys)), key=keys.__getitem__)
            if order != list(range(len(keys))):
                self._select(order)

    def _step_all(self) -> None:
        """One decode step for every active row; rows that finish leave the batch."""
        rows = self._rows
        try:
            ids = torch.tensor([[r.last] for r in rows], dtype=torch.long, device=self.device)
            positions = torch.tensor([[r.position] for r in rows], dtype=torch.long, device=self.device)
            mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
            logits = self._forward(ids, mask, positions, self._cache, [r.request.adapter for r in rows])
            self._mask = mask
            tokens = _choose(logits, rows)
        except BaseException as exc:  # the batch's state is unknown now: fail every row in it
            for r in rows:
                _finish(r.request, exc)
            self._rows, self._cache, self._mask = [], None, None
            return
        keep = []
        for i, (row, token) in enumerate(zip(rows, tokens)):
            row.position += 1
            try:
                finished = row.accept(token)
            except BaseException as exc:  # a failing callback ends its own request only
                _finish(row.request, exc)
                continue
            if finished:
                _finish(row.request)
            else:
                keep.append(i)
        if len(keep) < len(rows):
            self._drop(keep)

    def _drop(self, keep: list[int]) -> None:
        """Keep only the rows ``keep``, then trim the columns that are padding for all of them."""
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        self._select(keep)
        start = int(self._mask.any(dim=0).nonzero()[0])
        if start > 0:
            self._mask = self._mask[:, start:]
            for layer in self._cache.layers:
                layer.keys = layer.keys[:, :, start:]
                layer.values = layer.values[:, :, start:]

    def _select(self, rows: list[int]) -> None:
        """Keep the rows at ``rows``, in that order, with their cache and mask."""
        self._rows = [self._rows[i] for i in rows]
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask.index_select(0, index)


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``t`` with zeros added at the start of dimension ``dim`` up to ``width``."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    dims = t.dim()
    dim = dim % dims
    pad = [0, 0] * (dims - dim - 1) + [missing, 0]
    return F.pad(t, pad)


def _choose(logits: torch.Tensor, rows: list[_Row]) -> list[int]:
    """Each row's next token: the argmax for greedy rows, a sample for the others.

    Args:
        logits: [rows, vocab] float logits of the last position.
    """
    chosen = logits.argmax(dim=-1).tolist()
    for i, row in enumerate(rows):
        settings = row.request.settings
        if not settings.greedy:
            chosen[i] = _sample(logits[i:i + 1], settings, row.generator)
    return chosen


def _sample(logits: torch.Tensor, settings: GenerationSettings, generator: torch.Generator | None) -> int:
    """Temperature then top-p, as ``generate`` applies them (transformers' own logits warpers)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(float(settings.temperature))(None, logits)
    if settings.top_p < 1:
        scores = TopPLogitsWarper(float(settings.top_p))(None, scores)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator)[0, 0])


def _finish(request: GenerationRequest, error: BaseException | None = None) -> None:
    request.error = error
    request.done.set()
