"""Fixtures for the training tests: small generated datasets and a quick-training config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.train.config import TrainConfig

WORDS = ["amber", "birch", "cedar", "delta", "ember", "fjord", "grove", "heron", "iris", "jade",
         "kelp", "lumen", "maple", "north", "opal", "pine"]


def code_book_examples(n: int, *, offset: int = 0, system: str = "Answer with the code word.") -> list[dict]:
    """A tiny invented code book: each word maps to its reverse, upper-cased."""
    examples = []
    for i in range(n):
        word = WORDS[(i + offset) % len(WORDS)] + str((i + offset) // len(WORDS) or "")
        examples.append({"messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": f"code for {word}"},
            {"role": "assistant", "content": word[::-1].upper()},
        ]})
    return examples


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def train_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", code_book_examples(12))


@pytest.fixture
def valid_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "valid.jsonl", code_book_examples(4, offset=12))


def quick_config(model, data, out, **overrides) -> TrainConfig:
    """A config that trains the tiny model for a few steps, fast and deterministic."""
    settings = dict(model=str(model), data=str(data), out=str(out), epochs=2, batch_size=4,
                    learning_rate_multiplier=20.0, max_length=64, seed=7, device="cpu", warmup_ratio=0.0)
    settings.update(overrides)
    return TrainConfig(**settings)
