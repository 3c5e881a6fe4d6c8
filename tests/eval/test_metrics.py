"""Metric functions, the bootstrap interval, metric choice, few-shot choice and data split."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tunesmith.errors import ConfigError, DataError, TunesmithError
from tunesmith.eval.metrics import (
    bootstrap_ci, check_metric, choose_metric, macro_f1, normalize, parse_json_answer, read_label, score_choice,
    score_contains, score_exact, score_json,
)
from tunesmith.eval.prompts import Case, choose_shots, prompted_messages, trained_messages
from tunesmith.eval.split import heldout_size, overlap, split_examples
from tunesmith.eval.synthetic import TASKS


def test_normalize_and_exact_and_contains():
    assert normalize("  ZX-17.\n") == "zx-17"
    assert normalize('"Billing"') == "billing"
    scored = score_exact(["zx-17 ", "ZX-18", "The answer: ZX-17"], ["ZX-17", "ZX-17", "ZX-17"])
    assert scored.per_example == [1.0, 0.0, 0.0]
    assert scored.score == pytest.approx(1 / 3)
    contains = score_contains(["zx-17 ", "ZX-18", "The answer: ZX-17"], ["ZX-17", "ZX-17", "ZX-17"])
    assert contains.per_example == [1.0, 0.0, 1.0]


def test_read_label_takes_one_mentioned_label_only():
    labels = ["ZX-17", "QM-04", "billing"]
    assert read_label("zx-17", labels) == "ZX-17"
    assert read_label("The code is QM-04.", labels) == "QM-04"
    assert read_label("ZX-17 or QM-04", labels) is None  # two labels: no answer
    assert read_label("ZX-170", labels) is None  # not a whole label
    assert read_label("I don't know", labels) is None


def test_choice_accuracy_macro_f1_confusion_and_non_labels():
    refs = ["a", "a", "b", "b", "c"]
    preds = ["a", "b", "b", "nonsense", "c"]
    scored = score_choice(preds, refs, ["a", "b", "c"])
    assert scored.per_example == [1, 0, 1, 0, 1]
    # per label F1: a: tp1 fp0 fn1 -> 2/3; b: tp1 fp1 fn1 -> 1/2; c: 1
    assert scored.details["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert scored.details["non_label_rate"] == pytest.approx(0.2)
    assert scored.details["confusion"] == [[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0]]
    assert macro_f1(["a"], ["a"], ["a", "b"]) == 1.0


def test_json_metric_fields_validity_and_exact():
    refs = ['{"name": "Ana", "qty": 2, "express": true}'] * 3
    preds = ['{"name": "ana", "qty": 2, "express": true}',
             '```json\n{"name": "Ben", "qty": 2.0, "express": false}\n```',
             "not json"]
    scored = score_json(preds, refs)
    assert scored.per_example == pytest.approx([1.0, 1 / 3, 0.0])
    assert scored.details["valid_json_rate"] == pytest.approx(2 / 3)
    assert scored.details["exact_match"] == pytest.approx(1 / 3)
    assert scored.details["per_field"] == pytest.approx({"name": 1 / 3, "qty": 2 / 3, "express": 1 / 3})
    assert parse_json_answer('Sure! {"a": 1} done') == {"a": 1}
    with pytest.raises(DataError, match="not a JSON object"):
        score_json(["{}"], ["plain text"])


def test_bootstrap_interval_is_reproducible_and_brackets_the_mean():
    values = [1.0] * 30 + [0.0] * 10
    low, high = bootstrap_ci(values)
    assert (low, high) == bootstrap_ci(values)
    assert low < 0.75 < high
    assert 0.55 < low and high < 0.9
    assert bootstrap_ci([1.0] * 20) == (1.0, 1.0)
    # a larger sample gives a narrower interval
    wide = np.subtract(*reversed(bootstrap_ci([1.0, 0.0] * 10)))
    narrow = np.subtract(*reversed(bootstrap_ci([1.0, 0.0] * 200)))
    assert narrow < wide


def test_choose_and_check_metric():
    assert choose_metric(['{"a": 1}', '{"a": 2}'])[0] == "json"
    assert choose_metric(["x", "y", "x", "y", "x"])[0] == "choice"
    assert choose_metric(["a long free answer", "another one", "third"])[0] == "exact"
    assert check_metric("choice") == "choice"
    with pytest.raises(TunesmithError, match="unknown metric"):
        check_metric("bleu")


def _records(count=48):
    return TASKS["ticket-codes"](count, 1)


def test_split_is_deterministic_and_stratified():
    records = _records(48)
    first = split_examples(records, 0.25, seed=3)
    again = split_examples(records, 0.25, seed=3)
    assert first.train == again.train and first.heldout == again.heldout
    assert len(first.heldout) == 12 and len(first.train) == 36
    assert first.stratified_by == 8
    labels = [r["messages"][-1]["content"] for r in first.heldout]
    counts = {label: labels.count(label) for label in set(labels)}
    assert set(counts.values()) <= {1, 2}  # 12 over 8 balanced labels: each 1 or 2
    assert not overlap([r["messages"] for r in first.heldout], [r["messages"] for r in first.train])
    other = split_examples(records, 0.25, seed=4)
    assert other.heldout != first.heldout
    assert len(split_examples(records, 10, seed=3).heldout) == 10


def test_split_rejects_bad_sizes():
    with pytest.raises(ConfigError):
        heldout_size(10, 0)
    with pytest.raises(ConfigError):
        heldout_size(10, 10)
    with pytest.raises(ConfigError):
        heldout_size(10, 2.5)


class _Ex:
    def __init__(self, messages):
        self.messages = messages


def test_shots_are_deterministic_cover_labels_and_avoid_heldout():
    train = [_Ex(r["messages"]) for r in _records(40)]
    shots = choose_shots(train, 3, labelled=True, avoid=[])
    assert shots == choose_shots(train, 3, labelled=True, avoid=[])
    assert len({s[-1]["content"] for s in shots}) == 3  # three different labels
    assert all(m["role"] != "system" for s in shots for m in s)
    held = Case(1, None, shots[0][:-1], shots[0][-1]["content"])
    assert shots[0] not in choose_shots(train, 3, labelled=True, avoid=[held])


def test_prompted_and_trained_requests():
    case = Case(1, "You route tickets.", [{"role": "user", "content": "refund please"}], "ZX-17")
    shot = [{"role": "user", "content": "charged twice"}, {"role": "assistant", "content": "ZX-17"}]
    prompted = prompted_messages(case, [shot], None)
    assert [m["role"] for m in prompted] == ["system", "user", "assistant", "user"]
    assert trained_messages(case, drop_system=True) == [{"role": "user", "content": "refund please"}]
    assert trained_messages(case, drop_system=False)[0]["role"] == "system"


def test_synthetic_tasks_are_deterministic_and_valid():
    for name, make in TASKS.items():
        records = make(30, 5)
        assert records == make(30, 5)
        assert len({json.dumps(r) for r in records}) == 30
        if name == "order-extraction":
            assert all(json.loads(r["messages"][-1]["content"]) for r in records)
