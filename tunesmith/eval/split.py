"""Deterministic train / held-out splits, stratified by label for classification data.

The same file, fraction (or count) and seed always give the same split, so an
evaluation never sees training examples and can be repeated. Overlap between a
held-out file and a training file is found by the prompt each example asks.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import ConfigError, TunesmithError


@dataclass
class Split:
    """The two halves of a dataset (OpenAI chat records) and how they were cut.

    Attributes:
        train: the training records.
        heldout: the held-out records.
        stratified_by: how many labels the split was stratified over (0 when it was not).
    """

    train: list[dict]
    heldout: list[dict]
    stratified_by: int


def answer_of(messages: list[dict]) -> str:
    """The reference answer of an example: its last assistant message's content."""
    for message in reversed(messages):
        if message.get("role") == "assistant":
            return str(message.get("content") or "")
    return ""


def prompt_key(messages: list[dict]) -> str:
    """What an example asks, without its answer or system prompt: for finding duplicates."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
    asked = [(m.get("role"), " ".join(str(m.get("content") or "").split()).casefold())
             for m in messages[:last] if m.get("role") != "system"]
    return json.dumps(asked)


def heldout_size(total: int, heldout: float) -> int:
    """How many of ``total`` examples go to the held-out side for a fraction or count.

    Raises:
        ConfigError: a fraction outside (0, 1), or a count that leaves no training example.
    """
    if isinstance(heldout, bool) or not isinstance(heldout, (int, float)) or heldout <= 0:
        raise ConfigError([f"heldout: must be a fraction in (0, 1) or a count ≥ 1, got {heldout!r}"])
    if heldout < 1:
        size = max(1, round(total * heldout))
    elif float(heldout).is_integer():
        size = int(heldout)
    else:
        raise ConfigError([f"heldout: {heldout} is neither a fraction below 1 nor a whole count"])
    if size >= total:
        raise ConfigError([f"heldout: {size} held-out examples leave none of the {total} to train on"],
                          "hold out fewer examples")
    return size


def split_examples(records: list[dict], heldout: float, *, seed: int = 42, stratify: bool | None = None) -> Split:
    """Split chat records into train and held-out, deterministically.

    Args:
        records: OpenAI chat records (``{"messages": [...]}``).
        heldout: a fraction in (0, 1) or a whole count of held-out examples.
        seed: the shuffle seed.
        stratify: keep each label's share on both sides; None = when the answers look like labels.

    Returns:
        A :class:`Split`; both sides keep the file's order.
    """
    from tunesmith.eval.metrics import choose_metric

    size = heldout_size(len(records), heldout)
    answers = [answer_of(r["messages"]) for r in records]
    if stratify is None:
        stratify = choose_metric(answers)[0] == "choice"
    rng = random.Random(seed)
    if stratify:
        chosen = _stratified(answers, size, rng)
        labels = len(set(answers))
    else:
        chosen = set(rng.sample(range(len(records)), size))
        labels = 0
    train = [r for i, r in enumerate(records) if i not in chosen]
    held = [r for i, r in enumerate(records) if i in chosen]
    return Split(train, held, labels)


def _stratified(answers: list[str], size: int, rng: random.Random) -> set[int]:
    """``size`` indices, each label contributing in proportion (largest remainders get the rest)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, answer in enumerate(answers):
        groups[answer].append(i)
    share = {label: len(items) * size / len(answers) for label, items in groups.items()}
    take = {label: math.floor(s) for label, s in share.items()}
    remainder = sorted(groups, key=lambda label: (-(share[label] - take[label]), label))
    for label in remainder[: size - sum(take.values())]:
        take[label] += 1
    chosen: set[int] = set()
    for label in sorted(groups):
        items = list(groups[label])
        rng.shuffle(items)
        chosen.update(items[: take[label]])
    return chosen


def split_file(path: str | Path, heldout: float, *, seed: int = 42, stratify: bool | None = None,
               train_out: str | Path | None = None, heldout_out: str | Path | None = None) -> tuple[Split, Path, Path]:
    """Split a data file (any supported format) into two OpenAI chat JSONL files.

    Args:
        path: the data file.
        heldout: fraction or count for the held-out side.
        seed, stratify: as for :func:`split_examples`.
        train_out, heldout_out: output files (default: ``<stem>.train.jsonl`` / ``<stem>.heldout.jsonl`` beside it).

    Returns:
        (the split, the training file, the held-out file).

    Raises:
        DataError: the file has invalid examples; ConfigError: a bad fraction or count.
    """
    from tunesmith.data.examples import load_examples
    from tunesmith.eval.synthetic import write_jsonl

    source = Path(path)
    records = [e.to_record() for e in load_examples(source, min_examples=2)]
    split = split_examples(records, heldout, seed=seed, stratify=stratify)
    stem = source.name.rsplit(".", 1)[0] if "." in source.name else source.name
    train_path = Path(train_out) if train_out is not None else source.with_name(f"{stem}.train.jsonl")
    held_path = Path(heldout_out) if heldout_out is not None else source.with_name(f"{stem}.heldout.jsonl")
    if source.resolve() in (train_path.resolve(), held_path.resolve()):
        raise TunesmithError(f"the split would overwrite its own input {source}", "choose other output names")
    write_jsonl(train_path, split.train)
    write_jsonl(held_path, split.heldout)
    return split, train_path, held_path


def overlap(heldout: list[list[dict]], train: list[list[dict]]) -> list[int]:
    """Indices of held-out examples whose prompt also appears in the training set."""
    seen = {prompt_key(messages) for messages in train}
    return [i for i, messages in enumerate(heldout) if prompt_key(messages) in seen]
