"""Full fine-tuning: every parameter trains; the result is a complete model folder."""

from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.errors import TunesmithError
from tunesmith.train.methods import register

WEIGHTS_FILE = "model.safetensors"


class FullFineTuning:
    name = "full"
    is_adapter = False
    # A small model moves far with little: 2e-5 is the usual full fine-tuning rate near 100M.
    base_learning_rate = 2e-5

    def load_dtype(self, device: torch.device, precision: str) -> torch.dtype:
        # fp32 master weights: bf16 weights lose most AdamW updates (they are below bf16's
        # resolution); compute still runs in bf16 under autocast on GPUs that support it.
        return torch.float32

    def settings(self, config, continue_adapter: Path | None) -> dict:
        return {}

    def prepare(self, model, config, *, continue_adapter: Path | None):
        if continue_adapter is not None:
            raise TunesmithError("full fine-tuning cannot continue an adapter",
                                 "the recipe merges the adapter into the base first; this is a bug")
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model

    def save_weights(self, model, folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)

    def load_weights(self, model, folder: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(folder / WEIGHTS_FILE), device=str(next(model.parameters()).device))
        # Tied weights (lm_head = embeddings) are stored once; named_parameters() lists them once too.
        missing = [name for name, _ in model.named_parameters() if name not in state]
        if missing:
            raise TunesmithError(f"checkpoint {folder} lacks weights: {', '.join(missing[:5])}",
                                 "the checkpoint is damaged; delete it to resume from the one before")
        model.load_state_dict(state, strict=False)


register(FullFineTuning())
