"""Fixtures writing small data files for the data-layer tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datafiles import good_records


@pytest.fixture
def write(tmp_path):
    """write(name, content): a str/bytes is written as is, a list of records as JSONL."""

    def _write(name: str, content) -> Path:
        path = tmp_path / name
        if isinstance(content, list):
            content = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in content)
        if isinstance(content, str):
            content = content.encode("utf-8")
        path.write_bytes(content)
        return path

    return _write


@pytest.fixture
def with_bad_line(write):
    """with_bad_line(bad, at=7): 12 good chat examples with ``bad`` (a record or a raw line) at line ``at``."""

    def _build(bad, at: int = 7, name: str = "train.jsonl") -> Path:
        lines = [json.dumps(r) for r in good_records(12)]
        lines.insert(at - 1, bad if isinstance(bad, str) else json.dumps(bad))
        return write(name, "\n".join(lines) + "\n")

    return _build


@pytest.fixture(scope="session")
def smollm2_tokenizer(tiny_model_path):
    """The SmolLM2 tokenizer (ChatML, the model's own template), loaded once; do not modify it."""
    from tunesmith.models.loading import load_tokenizer

    return load_tokenizer(tiny_model_path)


@pytest.fixture(scope="session")
def gemma_tokenizer(tiny_gemma_path):
    """The Gemma 3 tokenizer (tunesmith's gemma-turns template), loaded once (it takes seconds)."""
    from tunesmith.models.loading import load_tokenizer

    return load_tokenizer(tiny_gemma_path)
