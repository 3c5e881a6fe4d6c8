"""Tiny LoRA adapters on the tiny random model, made with peft (random non-zero B, big enough to change answers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunesmith.models.loading import load_causal_lm


def make_adapter(base_path: Path, folder: Path, seed: int, *, rank: int = 4, use_dora: bool = False,
                 targets: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """Save a peft LoRA (or DoRA) adapter with random weights for ``base_path`` in ``folder``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = load_causal_lm(base_path, device=torch.device("cpu"), dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False,
                        use_dora=use_dora, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # big enough to change the greedy answer
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.mul_(20)
    peft_model.save_pretrained(folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base_path)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_path, tmp_path_factory) -> dict[str, Path]:
    """Two LoRA adapters of different ranks and targets, and one DoRA adapter, on the tiny model."""
    root = tmp_path_factory.mktemp("adapters")
    return {"a": make_adapter(tiny_model_path, root / "adapter-a", seed=1),
            "b": make_adapter(tiny_model_path, root / "adapter-b", seed=2, rank=8,
                              targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
            "dora": make_adapter(tiny_model_path, root / "adapter-dora", seed=3, use_dora=True)}
