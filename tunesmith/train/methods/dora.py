"""DoRA: LoRA with a learned magnitude per output feature (peft ``use_dora``)."""

from __future__ import annotations

from tunesmith.train.methods import register
from tunesmith.train.methods.lora import LoraFamily

register(LoraFamily("dora", use_dora=True))
