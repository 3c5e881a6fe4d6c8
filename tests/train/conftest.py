"""Fixtures for the training tests: generated datasets and runs trained once per session.

Runs are shared by the tests that only read them, so the training suite trains a
handful of tiny runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from trainhelpers import code_book_examples, quick_config, write_jsonl


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """train.jsonl (12 examples), valid.jsonl (4), more.jsonl (12 new ones for continued training)."""
    folder = tmp_path_factory.mktemp("train-data")
    write_jsonl(folder / "train.jsonl", code_book_examples(12))
    write_jsonl(folder / "valid.jsonl", code_book_examples(4, offset=12))
    write_jsonl(folder / "more.jsonl", code_book_examples(12, offset=20, system="Answer with the code word."))
    return folder


@pytest.fixture(scope="session")
def trained(tiny_model_path, data_dir, tmp_path_factory):
    """``trained(method)`` → (config, result, events) of one uninterrupted run, trained once per session."""
    from tunesmith.train.recipe import train

    root = tmp_path_factory.mktemp("runs")
    cache: dict[str, tuple] = {}

    def get(method: str):
        if method not in cache:
            config = quick_config(tiny_model_path, data_dir / "train.jsonl", root / method, method=method,
                                  validation=str(data_dir / "valid.jsonl"))
            events: list = []
            result = train(config, on_event=events.append)
            cache[method] = (config, result, events)
        return cache[method]

    return get
