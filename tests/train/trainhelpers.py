"""Helpers for the training tests: small generated datasets and quick configs."""

from __future__ import annotations

import json
from pathlib import Path

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


# Learning rates are scaled up: the tiny random model needs big steps to move in a few of them.
LEARNING_RATE_MULTIPLIER = {"lora": 250.0, "dora": 250.0, "full": 500.0}


def quick_config(model, data, out, **overrides) -> TrainConfig:
    """A config that trains the tiny model for a few steps on the CPU, fast and deterministic."""
    method = overrides.get("method", "lora")
    settings = dict(model=str(model), data=str(data), out=str(out), method=method, epochs=2, batch_size=4,
                    learning_rate_multiplier=LEARNING_RATE_MULTIPLIER[method], max_length=64, seed=7,
                    device="cpu", warmup_ratio=0.0, precision="fp32")
    if method != "full":
        settings["lora_dropout"] = 0.05  # so that resuming must restore the dropout RNG too
    settings.update(overrides)
    return TrainConfig(**settings)
