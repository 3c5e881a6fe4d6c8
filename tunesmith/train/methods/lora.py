"""LoRA through peft: small low-rank adapters train, the base stays frozen.

rsLoRA (``use_rslora``: scale alpha/sqrt(r) instead of alpha/r) is an option of
this method; DoRA (``dora.py``) is the same family with ``use_dora``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.train.methods import register

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DEFAULTS = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear",
            "use_rslora": False}


class LoraFamily:
    """LoRA-family methods differ only in the peft ``LoraConfig`` flags they set."""

    is_adapter = True
    base_learning_rate = 2e-4

    def __init__(self, name: str, *, use_dora: bool = False):
        self.name = name
        self.use_dora = use_dora

    def load_dtype(self, device: torch.device, precision: str) -> torch.dtype:
        # A bf16 run on a GPU keeps the frozen base in bf16 (half the memory, no casts);
        # peft keeps the adapter weights in fp32. An fp32 run computes in fp32 everywhere.
        return torch.bfloat16 if precision == "bf16" and device.type == "cuda" else torch.float32

    def settings(self, config, continue_adapter: Path | None) -> dict:
        if continue_adapter is None:
            return {"lora_r": config.lora_r, "lora_alpha": config.lora_alpha,
                    "lora_dropout": config.lora_dropout, "target_modules": config.target_modules,
                    "use_rslora": config.use_rslora, "use_dora": self.use_dora}
        saved = read_adapter_config(continue_adapter)
        continued = {"lora_r": saved.get("r"), "lora_alpha": saved.get("lora_alpha"),
                     "lora_dropout": saved.get("lora_dropout"), "target_modules": saved.get("target_modules"),
                     "use_rslora": bool(saved.get("use_rslora")), "use_dora": bool(saved.get("use_dora"))}
        # Continuing an adapter keeps its shape; a different setting asked for explicitly is a conflict,
        # never silently dropped.
        conflicts = [f"{key}: {getattr(config, key)!r} asked for, but the adapter being continued has "
                     f"{continued[key]!r}"
                     for key in ("lora_r", "lora_alpha", "lora_dropout", "use_rslora")
                     if getattr(config, key) != DEFAULTS[key] and getattr(config, key) != continued[key]]
        if conflicts:
            raise ConfigError(conflicts, "leave these settings out to continue the adapter as it is, or "
                              "start a new adapter from the merged model (tunesmith export RUN --merged DIR)")
        return continued

    def prepare(self, model, config, *, continue_adapter: Path | None):
        from peft import LoraConfig, PeftModel, get_peft_model

        with warnings.catch_warnings():
            # peft calls a transformers helper that transformers 5 marks deprecated; not ours to fix
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            if continue_adapter is not None:
                return PeftModel.from_pretrained(model, str(continue_adapter), is_trainable=True)
            lora = LoraConfig(
                task_type="CAUSAL_LM",
                r=config.lora_r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=config.target_modules,
                use_rslora=config.use_rslora,
                use_dora=self.use_dora,
            )
            try:
                return get_peft_model(model, lora)
            except ValueError as exc:
                raise ConfigError([f"target_modules: {exc}"],
                                  "use 'all-linear' or names of linear layers in this model") from exc

    def save_weights(self, model, folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)

    def load_weights(self, model, folder: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = load_file(str(folder / ADAPTER_WEIGHTS), device=str(next(model.parameters()).device))
        result = set_peft_model_state_dict(model, state)
        missing = [key for key in getattr(result, "missing_keys", []) if "lora_" in key]
        if missing:
            raise TunesmithError(f"checkpoint {folder} lacks adapter weights: {', '.join(missing[:5])}",
                                 "the checkpoint is damaged; delete it to resume from the one before")


def read_adapter_config(folder: Path) -> dict:
    """The ``adapter_config.json`` of a PEFT adapter folder.

    Raises:
        TunesmithError: the folder holds no adapter.
    """
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise TunesmithError(f"{folder} is not a PEFT adapter folder (no {ADAPTER_CONFIG})",
                             "pass the final/ folder of a finished LoRA run")
    return json.loads(path.read_text(encoding="utf-8"))


register(LoraFamily("lora"))
