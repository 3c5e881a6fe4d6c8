"""Scoring answers against references: exact, contains, choice and json.

Each metric turns (prediction, reference) pairs into one score per example (so
a bootstrap can resample them) plus the task-level figures the report shows.
Metrics join through :data:`METRICS`; ``auto`` picks one from the references.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from tunesmith.errors import DataError, TunesmithError

NAMES = ("exact", "contains", "choice", "json")
MAX_CHOICE_LABELS = 50


def normalize(text: str) -> str:
    """Case-folded, whitespace-collapsed, without surrounding quotes or final punctuation."""
    text = " ".join(str(text).split()).casefold()
    return text.strip().strip("\"'`").rstrip(".!;:,").strip()


@dataclass
class Scored:
    """A metric's verdict on one model's answers.

    Attributes:
        metric: the metric's name.
        per_example: one score in [0, 1] per example (what the confidence interval resamples).
        details: task-level figures (accuracy, macro-F1, confusion matrix, valid-JSON rate...).
        parsed: what each answer was read as (a label, a JSON object, or None).
    """

    metric: str
    per_example: list[float]
    details: dict = field(default_factory=dict)
    parsed: list = field(default_factory=list)

    @property
    def score(self) -> float:
        """The headline score: the mean of the per-example scores."""
        return float(np.mean(self.per_example)) if self.per_example else 0.0


def score_exact(predictions: list[str], references: list[str], labels=None) -> Scored:
    """1 when the normalised answer equals the normalised reference."""
    per = [float(normalize(p) == normalize(r)) for p, r in zip(predictions, references)]
    return Scored("exact", per, {"accuracy": _mean(per)}, [normalize(p) for p in predictions])


def score_contains(predictions: list[str], references: list[str], labels=None) -> Scored:
    """1 when the normalised reference appears in the normalised answer."""
    per = [float(normalize(r) in normalize(p)) for p, r in zip(predictions, references)]
    return Scored("contains", per, {"accuracy": _mean(per)}, [normalize(p) for p in predictions])


def read_label(prediction: str, labels: list[str]) -> str | None:
    """The label an answer gives: the answer itself, or the one label it mentions; None otherwise.

    A model that writes "The code is ZX-17." is read as ``ZX-17``; one that names
    two labels, or none, gave no label.
    """
    by_norm = {normalize(label): label for label in labels}
    answer = normalize(prediction)
    if answer in by_norm:
        return by_norm[answer]
    found = [label for norm, label in by_norm.items()
             if norm and re.search(r"(?<![\w-])" + re.escape(norm) + r"(?![\w-])", answer)]
    return found[0] if len(found) == 1 else None


def score_choice(predictions: list[str], references: list[str], labels: list[str] | None = None) -> Scored:
    """Classification: accuracy, macro-F1, confusion matrix and the non-label rate.

    Args:
        labels: the label set (default: the distinct references).
    """
    labels = sorted(set(labels or []) | set(references))
    parsed = [read_label(p, labels) for p in predictions]
    per = [float(p == r) for p, r in zip(parsed, references)]
    index = {label: i for i, label in enumerate(labels)}
    # rows: reference label; columns: predicted label, plus a last column for "not a label"
    confusion = np.zeros((len(labels), len(labels) + 1), dtype=int)
    for p, r in zip(parsed, references):
        confusion[index[r], index[p] if p is not None else len(labels)] += 1
    details = {
        "accuracy": _mean(per),
        "macro_f1": macro_f1(parsed, references, labels),
        "non_label_rate": _mean([float(p is None) for p in parsed]),
        "labels": labels,
        "confusion": confusion.tolist(),
    }
    return Scored("choice", per, details, parsed)


def macro_f1(parsed: list[str | None], references: list[str], labels: list[str]) -> float:
    """The unweighted mean of per-label F1 over the labels that occur in the references."""
    scores = []
    for label in sorted(set(references)):
        tp = sum(1 for p, r in zip(parsed, references) if p == label and r == label)
        fp = sum(1 for p, r in zip(parsed, references) if p == label and r != label)
        fn = sum(1 for p, r in zip(parsed, references) if p != label and r == label)
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def parse_json_answer(text: str):
    """The JSON object in an answer (bare, or inside a ``` fence), or None."""
    candidate = text.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", candidate, re.DOTALL)
    if fence:
        candidate = fence.group(1).strip()
    try:
        value = json.loads(candidate)
    except ValueError:
        start, end = candidate.find("{"), candidate.rfind("}")
        if start < 0 or end <= start:
            return None
        try:
            value = json.loads(candidate[start:end + 1])
        except ValueError:
            return None
    return value if isinstance(value, dict) else None


def _same_value(a, b) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return normalize(a) == normalize(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def score_json(predictions: list[str], references: list[str], labels=None) -> Scored:
    """Structured output: valid-JSON rate, per-field accuracy, exact-object rate.

    The per-example score is the share of the reference's fields the answer got right
    (0 for an answer that is not a JSON object).

    Raises:
        DataError: a reference is not a JSON object.
    """
    refs = []
    for i, reference in enumerate(references, start=1):
        value = parse_json_answer(reference)
        if value is None:
            raise DataError(f"held-out example {i}: the reference answer is not a JSON object, so metric "
                            "'json' cannot score it", hint="choose --metric exact, contains or choice")
        refs.append(value)
    parsed = [parse_json_answer(p) for p in predictions]
    per, exact = [], []
    fields: dict[str, list[float]] = {}
    for got, want in zip(parsed, refs):
        hits = [float(got is not None and key in got and _same_value(got[key], value)) for key, value in want.items()]
        for key, hit in zip(want, hits):
            fields.setdefault(key, []).append(hit)
        per.append(_mean(hits) if hits else float(got == want))
        exact.append(float(got is not None and all(hits) and set(got) == set(want)))
    details = {
        "field_accuracy": _mean(per),
        "valid_json_rate": _mean([float(p is not None) for p in parsed]),
        "exact_match": _mean(exact),
        "per_field": {key: _mean(values) for key, values in fields.items()},
    }
    return Scored("json", per, details, parsed)


METRICS: dict[str, Callable[..., Scored]] = {
    "exact": score_exact,
    "contains": score_contains,
    "choice": score_choice,
    "json": score_json,
}


def choose_metric(references: list[str], training_answers: list[str] | None = None) -> tuple[str, str]:
    """Pick a metric from the references; returns (metric, why) for the user.

    Every reference a JSON object → ``json``; a small set of answers that repeat (in the
    held-out and training answers together) → ``choice``; anything else → ``exact``.
    """
    if references and all(parse_json_answer(r) is not None and r.strip().startswith(("{", "`")) for r in references):
        return "json", "every reference answer is a JSON object"
    answers = list(references) + list(training_answers or [])
    counts = Counter(normalize(r) for r in answers)
    held = {normalize(r) for r in references}
    if 2 <= len(counts) <= MAX_CHOICE_LABELS and len(answers) >= 2 * len(counts) and held <= set(counts):
        return "choice", f"the {len(answers)} answers (held-out and training) take {len(counts)} distinct values"
    return "exact", "the answers are free text"


def check_metric(name: str) -> str:
    """``name`` if it is a metric (or ``auto``).

    Raises:
        TunesmithError: an unknown metric, naming the known ones.
    """
    if name == "auto" or name in METRICS:
        return name
    raise TunesmithError(f"unknown metric {name!r}", f"use one of: auto, {', '.join(NAMES)}", param="metric")


def bootstrap_ci(values: list[float], *, resamples: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """A percentile bootstrap confidence interval for the mean of ``values``.

    Args:
        values: per-example scores.
        resamples: bootstrap resamples.
        level: confidence level (0.95 gives the 2.5th and 97.5th percentiles).
        seed: makes the interval reproducible.

    Returns:
        (low, high); (mean, mean) when there are fewer than two values.
    """
    data = np.asarray(values, dtype=float)
    if data.size < 2:
        mean = float(data.mean()) if data.size else 0.0
        return mean, mean
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else 0.0
