"""TrainConfig validation: every problem at once, before anything is loaded."""

from __future__ import annotations

import pytest

from tunesmith.errors import ConfigError
from tunesmith.train.config import TrainConfig
from tunesmith.train.hyperparams import ModelShape, resolve_batch_size, resolve_learning_rate


def test_every_problem_is_reported_at_once(tmp_path):
    config = TrainConfig(model="no-such-model", data=str(tmp_path / "missing.jsonl"),
                         validation=str(tmp_path / "also-missing.jsonl"), method="qlora", epochs=0,
                         batch_size="many", learning_rate_multiplier=-1.0, lora_r=0, lora_dropout=1.5,
                         target_modules=[], max_length=4, suffix="bad suffix!", schedule="step",
                         warmup_ratio=2.0, gradient_accumulation_steps=0, device="tpu",
                         precision="fp16")
    with pytest.raises(ConfigError) as caught:
        config.validate()
    fields = [problem.split(":")[0] for problem in caught.value.problems]
    assert fields == ["model", "data", "validation", "method", "epochs", "batch_size",
                      "learning_rate_multiplier", "lora_r", "lora_dropout", "target_modules", "max_length",
                      "suffix", "gradient_accumulation_steps", "warmup_ratio", "schedule", "device", "precision"]
    assert "no-such-model" in caught.value.problems[0] and "smollm2-135m" in caught.value.problems[0]


def test_auto_and_numbers_are_valid(tiny_model_path, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    assert TrainConfig(model=str(tiny_model_path), data=str(data)).problems() == []
    assert TrainConfig(model="smollm2-135m", data=str(data), epochs=3, batch_size=8,
                       learning_rate_multiplier=0.5, method="full").problems() == []


def test_conflicting_settings(tiny_model_path, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    config = TrainConfig(model=str(tiny_model_path), data=str(data), validation=str(data), validation_split=0.1,
                         method="full", use_rslora=True)
    problems = config.problems()
    assert any(p.startswith("validation_split:") for p in problems)
    assert any(p.startswith("use_rslora:") for p in problems)
    assert any(p.startswith("replay:") for p in
               TrainConfig(model=str(tiny_model_path), data=str(data), replay=1.0).problems())


def test_from_dict_round_trip_and_unknown_keys(tmp_path):
    config = TrainConfig(model="smollm2-135m", data="x.jsonl", epochs=2, target_modules=["q_proj"])
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="nope: unknown setting"):
        TrainConfig.from_dict({**config.to_dict(), "nope": 1})


def test_auto_rules():
    small = ModelShape(parameters=135_000_000, vocab_size=49152, hidden_size=576, layers=30)
    config = TrainConfig(model="m", data="d", max_length=16)  # memory is no limit here
    sizes = [resolve_batch_size(config, n, small, __import__("torch").device("cpu")) for n in (10, 64, 256, 100_000)]
    assert sizes[:3] == [1, 2, 8] and sizes[3] <= 32  # grows with the data, capped (and by memory)
    assert resolve_learning_rate(config, 2e-4, True, small) == (1.0, 2e-4)
    multiplier, rate = resolve_learning_rate(config, 2e-5, False, small)
    assert multiplier == 1.0 and rate == pytest.approx(2e-5 * (100 / 135) ** 0.5)
    doubled = TrainConfig(model="m", data="d", learning_rate_multiplier=2.0)
    assert resolve_learning_rate(doubled, 2e-4, True, small) == (2.0, 4e-4)
