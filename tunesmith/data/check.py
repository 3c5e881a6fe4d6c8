"""``tunesmith data check``: validate a training file and describe it with the model's tokenizer.

One streaming pass: records are read, normalised, rendered with the model's
chat template and tokenized in batches; each batch is tokenized (in Rust, on
every core) while the next one is read and rendered. Per example only counts and
a 64-bit hash are kept, and at most two batches are in flight, so memory stays
flat however large the file. Data problems are
reported in :class:`DataReport` (never raised); a missing file or an unknown
model raise :class:`~tunesmith.errors.TunesmithError`.
"""

from __future__ import annotations

import functools
import gc
import json
from array import array
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from tunesmith.data.chat import (
    ChatRenderer,
    TemplateError,
    batched,
    renderer_for,
    tokenized_batches,
    tokens_starting_before,
)
from tunesmith.data.examples import MIN_EXAMPLES, Example, ExampleStream
from tunesmith.data.stats import (
    DataStats,
    LengthHistogram,
    auto_epochs,
    estimate_training_seconds,
    measure_matmul_flops,
)
from tunesmith.errors import NotFoundError, TunesmithError

BATCH = 512            # examples rendered and tokenized together
SHOWN_PER_WARNING = 5  # example lines named in each warning
MAX_SYSTEM_PROMPTS = 1000  # distinct system prompts tracked (beyond that only counted)


@dataclass
class DataReport:
    """The outcome of checking one data file.

    Attributes:
        file: the file as named in messages.
        model: the model whose tokenizer and template were used.
        template: where that chat template came from (``model``, ``tunesmith:gemma-turns``…).
        format: the detected format's title, or None.
        examples: examples in the file (valid or not).
        errors: problem messages ``FILE:LINE: field: what — fix`` (capped; see ``error_count``).
        error_count: how many problems there are in all.
        warnings: what does not block training but deserves a look.
        stats: token statistics of the valid examples (None when there are none).
    """

    file: str
    model: str
    template: str
    format: str | None
    examples: int
    errors: list[str]
    error_count: int
    warnings: list[str]
    stats: DataStats | None

    @property
    def ok(self) -> bool:
        return self.error_count == 0

    def to_dict(self) -> dict:
        return {"file": self.file, "ok": self.ok, "model": self.model, "template": self.template,
                "format": self.format, "examples": self.examples, "error_count": self.error_count,
                "errors": self.errors, "warnings": self.warnings,
                "stats": self.stats.to_dict() if self.stats else None}


@dataclass
class _Sightings:
    """How many examples showed one condition, and the first few of them."""

    count: int = 0
    shown: list[str] = field(default_factory=list)

    def add(self, detail: str) -> None:
        self.count += 1
        if len(self.shown) < SHOWN_PER_WARNING:
            self.shown.append(detail)

    def listing(self) -> str:
        more = f", … {self.count - len(self.shown)} more" if self.count > len(self.shown) else ""
        return "; ".join(self.shown) + more


@dataclass
class _Observer:
    """Everything ``data check`` accumulates while streaming: counts, histograms, hashes."""

    limit: int
    markers: tuple[str, ...]
    lengths: LengthHistogram = field(default_factory=LengthHistogram)
    kept_tokens: int = 0
    trainable: int = 0
    truncated: _Sightings = field(default_factory=_Sightings)
    truncated_tokens: int = 0
    weightless: _Sightings = field(default_factory=_Sightings)
    marker_text: _Sightings = field(default_factory=_Sightings)
    hashes: array = field(default_factory=lambda: array("q"))
    lines: array = field(default_factory=lambda: array("q"))
    systems: Counter = field(default_factory=Counter)
    system_first_line: dict = field(default_factory=dict)

    def observe(self, text: str, spans: list[tuple[int, int]], example: Example, encoding) -> None:
        """Count one rendered example; ``encoding`` is its tokenizer encoding."""
        n = len(encoding)
        self.lengths.add(n)
        kept = min(n, self.limit)
        self.kept_tokens += kept
        trainable = _count_in_spans(encoding.offsets, spans, kept) if spans else 0
        self.trainable += trainable
        if n > self.limit:
            self.truncated.add(f"line {example.line}: {n:,} tokens, {n - self.limit:,} cut")
            self.truncated_tokens += n - self.limit
        if not spans:
            self.weightless.add(f"line {example.line}")
        self.hashes.append(hash(text))
        self.lines.append(example.line)
        system = next((m["content"] for m in example.messages if m["role"] == "system"), None)
        key = hash(system) if system is not None else None
        if key in self.systems or len(self.systems) < MAX_SYSTEM_PROMPTS:
            self.systems[key] += 1
            self.system_first_line.setdefault(key, example.line)
        for i, message in enumerate(example.messages):
            found = next((m for m in self.markers if m in message["content"]), None)
            if found:
                self.marker_text.add(f'line {example.line}: messages[{i}] contains "{found}"')
                break

    def duplicates(self) -> _Sightings:
        """Examples whose rendered text equals an earlier one's (by 64-bit hash)."""
        import numpy as np

        seen = _Sightings()
        if not self.hashes:
            return seen
        hashes = np.frombuffer(self.hashes, dtype=np.int64)
        lines = np.frombuffer(self.lines, dtype=np.int64)
        order = np.lexsort((lines, hashes))  # by hash, then by line: the first copy leads each run
        sorted_hashes = hashes[order]
        repeat = np.flatnonzero(sorted_hashes[1:] == sorted_hashes[:-1]) + 1
        if not len(repeat):
            return seen
        first_of_run = np.maximum.accumulate(np.where(np.r_[True, sorted_hashes[1:] != sorted_hashes[:-1]],
                                                      np.arange(len(order)), 0))
        pairs = sorted((int(lines[order[k]]), int(lines[order[first_of_run[k]]])) for k in repeat)
        for line, original in pairs:
            seen.add(f"line {line} repeats line {original}")
        return seen


def _count_in_spans(offsets: list[tuple[int, int]], spans, kept: int) -> int:
    """Tokens (among the first ``kept``) whose first character lies in a loss span."""
    return sum(tokens_starting_before(offsets, end, kept) - tokens_starting_before(offsets, begin, kept)
               for begin, end in spans)


def model_limits(path: Path) -> tuple[int | None, int | None]:
    """(context length, parameter count) of a model folder, read from its files without loading it."""
    from tunesmith.models.store import read_info

    context = None
    config_file = path / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config = config.get("text_config", config)
        context = next((config[k] for k in ("max_position_embeddings", "n_positions", "max_seq_len")
                        if isinstance(config.get(k), int)), None)
    info = read_info(path)
    parameters = info.parameters if info else _count_parameters(path)
    return context, parameters


def _count_parameters(path: Path) -> int | None:
    from safetensors import safe_open

    total = 0
    files = sorted(path.glob("*.safetensors"))
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                total += count
    return total or None


def _tokenizer(model_path: Path):
    """The model's tokenizer, loaded once per folder version (a Gemma tokenizer takes seconds;
    the service checks every upload)."""
    files = [model_path / name for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")]
    version = tuple(f.stat().st_mtime_ns if f.exists() else 0 for f in files)
    return _load_tokenizer_cached(str(model_path.resolve()), version)


@functools.lru_cache(maxsize=4)
def _load_tokenizer_cached(path: str, version: tuple):
    from tunesmith.models.loading import load_tokenizer

    return load_tokenizer(Path(path))


def check_file(path: str | Path, *, model: str = "smollm2-135m", max_length: int | None = None,
               name: str | None = None, progress: Callable[[int], None] | None = None) -> DataReport:
    """Validate a data file and compute its statistics with ``model``'s tokenizer and chat template.

    Args:
        path: the data file (JSONL, JSON array or CSV; any supported format).
        model: a registered model name, a Hugging Face folder or a .gguf file.
        max_length: the per-example token limit training will use (default: the model's context).
        name: how the file is named in messages (default: the path as given).
        progress: called with the number of examples read so far, every batch.

    Returns:
        The report; ``report.ok`` is False when the file has errors.

    Raises:
        NotFoundError: the file or the model does not exist.
        TunesmithError: the model cannot be prepared or its template cannot be masked.
    """
    from tunesmith.models.store import resolve_model

    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"data file {path} does not exist", "check the path", param="training_file")
    if max_length is not None and max_length < 1:
        raise TunesmithError(f"--max-length must be at least 1, got {max_length}", param="max_length")
    prepared = resolve_model(model)
    renderer = renderer_for(_tokenizer(prepared.path))
    context, parameters = model_limits(prepared.path)
    limit = min(x for x in (max_length, context) if x is not None) if (max_length or context) else 10**9
    stream = ExampleStream(path, name=name)
    observer = _Observer(limit=limit, markers=renderer.markers)
    rendered = (_render_batch(batch, renderer, stream) for batch in batched(stream, BATCH))
    with _collector_skips_older_objects():
        for batch, encodings in tokenized_batches(renderer, rendered):
            for item, encoding in zip(batch, encodings):
                observer.observe(*item, encoding)
            if progress is not None:
                progress(stream.records)
    stream.finish(MIN_EXAMPLES)
    if observer.lengths.n and observer.trainable == 0:
        stream.problems.add(None, None, "no example has an assistant message with weight 1, nothing would be "
                            "learned", "set weight 1 (or leave weight out) on the answers to learn")
    template = prepared.info.chat_template_source if prepared.info else "model"
    return DataReport(
        file=stream.problems.name, model=prepared.name, template=template,
        format=stream.format.title if stream.format else None, examples=stream.records,
        errors=stream.problems.listed(), error_count=stream.problems.count,
        warnings=_warnings(observer, stream.problems.name, limit, max_length, context),
        stats=_stats(observer, parameters),
    )


@contextmanager
def _collector_skips_older_objects() -> Iterator[None]:
    """Keep Python's cyclic garbage collector off the objects that exist before the pass.

    Why: the objects of the batches in flight survive young collections, so every so
    often the collector runs a full one, which walks the whole heap — mostly the
    ~300k objects of the imported torch and transformers, none of them garbage made
    here. That was a tenth of the check's time; ``gc.freeze`` sets them aside until
    the pass ends (the pass's own garbage is still collected, memory stays flat).
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _render_batch(batch: list[Example], renderer: ChatRenderer, stream: ExampleStream) -> list[tuple]:
    """(text, loss spans, example) of each example the template renders; the others become problems."""
    rendered = []
    for example in batch:
        try:
            text, spans = renderer.render_with_spans(example.messages, example.tools)
        except TemplateError as exc:
            stream.problems.add(example.line, "messages", exc.message, exc.hint)
            continue
        rendered.append((text, spans, example))
    return rendered


def _warnings(observer: _Observer, name: str, limit: int, max_length: int | None, context: int | None) -> list[str]:
    out = []
    duplicates = observer.duplicates()
    if duplicates.count:
        out.append(f"{name}: {duplicates.count} duplicate example{'s' if duplicates.count != 1 else ''} "
                   f"({duplicates.listing()}) — remove them: repeats weigh those answers more")
    if observer.truncated.count:
        why = "--max-length" if max_length is not None and (context is None or max_length <= context) \
            else "the model's context"
        out.append(f"{name}: {observer.truncated.count} example{'s' if observer.truncated.count != 1 else ''} "
                   f"longer than {limit:,} tokens ({why}), {observer.truncated_tokens:,} tokens will be cut "
                   f"({observer.truncated.listing()}) — shorten or split them"
                   + (" or raise --max-length" if why == "--max-length" else ""))
    systems = [key for key in observer.systems]
    if len(systems) > 1:
        with_prompt = sum(c for k, c in observer.systems.items() if k is not None)
        without = observer.systems.get(None, 0)
        distinct = len([k for k in systems if k is not None])
        parts = []
        if distinct > 1:
            parts.append(f"{distinct}{'+' if distinct >= MAX_SYSTEM_PROMPTS else ''} different system prompts "
                         f"across {with_prompt} examples")
        if without and with_prompt:
            first_without = observer.system_first_line[None]
            parts.append(f"{without} example{'s' if without != 1 else ''} without one (first: line {first_without})")
        common = max((k for k in systems if k is not None), key=lambda k: observer.systems[k])
        out.append(f"{name}: inconsistent system prompts: {', '.join(parts)}; the most common one is on "
                   f"{observer.systems[common]} examples (first: line {observer.system_first_line[common]}) — "
                   "use the same system prompt everywhere, the one you will ask the model with")
    if observer.weightless.count:
        out.append(f"{name}: {observer.weightless.count} example{'s' if observer.weightless.count != 1 else ''} "
                   f"with every assistant message at weight 0 ({observer.weightless.listing()}) — they teach "
                   "nothing: set weight 1 on the answers to learn")
    if observer.marker_text.count:
        out.append(f"{name}: {observer.marker_text.count} example{'s' if observer.marker_text.count != 1 else ''} "
                   f"contain the chat template's turn tokens as text ({observer.marker_text.listing()}) — "
                   "the tokenizer reads them as turn markers; remove them from the text")
    return out


def _stats(observer: _Observer, parameters: int | None) -> DataStats | None:
    lengths = observer.lengths
    if not lengths.n:
        return None
    epochs = auto_epochs(lengths.n)
    billed = observer.kept_tokens * epochs
    import torch

    from tunesmith.models.loading import native_precision

    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = native_precision(torch.device(device))  # what the trainer's "auto" picks
    flops, device_name = measure_matmul_flops(device)
    seconds = estimate_training_seconds(parameters, billed, flops, device, precision) if parameters else {}
    return DataStats(
        examples=lengths.n, tokens_min=min(lengths.counts), tokens_median=lengths.quantile(0.5),
        tokens_p95=lengths.quantile(0.95), tokens_max=max(lengths.counts), total_tokens=observer.kept_tokens,
        trainable_tokens=observer.trainable, max_length=observer.limit,
        truncated_examples=observer.truncated.count, truncated_tokens=observer.truncated_tokens,
        epochs=epochs, billed_tokens=billed, estimated_seconds=seconds, estimate_device=device_name,
    )
