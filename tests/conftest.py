"""Shared fixtures: an isolated TUNESMITH_HOME, the real base models, tiny random models.

The converted base models are cached in ``.cache/models`` at the project root so
repeated test runs convert them once; everything else a test writes goes to a
temporary TUNESMITH_HOME.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS_CACHE = ROOT / ".cache" / "models"


@pytest.fixture(scope="session", autouse=True)
def tunesmith_env(tmp_path_factory):
    """Point TUNESMITH_HOME at a temporary folder and share the converted-model cache."""
    MODELS_CACHE.mkdir(parents=True, exist_ok=True)
    home = tmp_path_factory.mktemp("tunesmith-home")
    old = {k: os.environ.get(k) for k in ("TUNESMITH_HOME", "TUNESMITH_MODELS_DIR")}
    os.environ["TUNESMITH_HOME"] = str(home)
    os.environ["TUNESMITH_MODELS_DIR"] = str(MODELS_CACHE)
    yield home
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def smollm2_path(tunesmith_env) -> Path:
    """The real SmolLM2-135M-Instruct, converted once into the shared cache."""
    from tunesmith.models.store import resolve_model

    return resolve_model("smollm2-135m").path


@pytest.fixture(scope="session")
def gemma3_path(tunesmith_env) -> Path:
    """The real Gemma 3 270M base, converted once into the shared cache."""
    from tunesmith.models.store import resolve_model

    return resolve_model("gemma3-270m").path


def build_tiny_model(real_path: Path, out: Path, **overrides) -> Path:
    """A randomly initialised model with ``real_path``'s architecture and real tokenizer.

    A few MB, so unit tests train and generate in seconds; seeded, so losses are exact.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(real_path)
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=2048)
    small.update(overrides)
    for key, value in small.items():
        setattr(config, key, value)
    if hasattr(config, "layer_types") and config.layer_types is not None:
        config.layer_types = config.layer_types[: config.num_hidden_layers]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig.from_pretrained(real_path)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(real_path).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_path(smollm2_path, tmp_path_factory) -> Path:
    """Tiny random Llama (SmolLM2 architecture and tokenizer): the unit-test model."""
    return build_tiny_model(smollm2_path, tmp_path_factory.mktemp("tiny-smollm2"))


@pytest.fixture(scope="session")
def tiny_gemma_path(gemma3_path, tmp_path_factory) -> Path:
    """Tiny random Gemma 3 (262k vocabulary, real tokenizer, no chat template of its own)."""
    return build_tiny_model(gemma3_path, tmp_path_factory.mktemp("tiny-gemma3"),
                            hidden_size=32, intermediate_size=64, head_dim=16)
