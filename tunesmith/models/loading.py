"""Load a prepared model folder for training or inference.

The tokenizer always leaves here with a chat template (the model's own, or one
built from its special tokens) and a pad token; the generation config's EOS is
the token that ends an assistant turn, so generation stops where training
taught it to.
"""

from __future__ import annotations

import functools

from pathlib import Path

import torch

from tunesmith.errors import TunesmithError
from tunesmith.models.templates import end_of_turn_token, template_for_tokens

MODEL_TEMPLATE = "model"


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles, where bf16 matmuls run several times faster than fp32."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without the probe: assume not
        return False


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX or AVX512-BF16)."""
    try:
        return cpu_has_amx() or bool(torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # a torch without these probes: assume not
        return False


def native_precision(device: torch.device) -> str:
    """``bf16`` where ``device`` multiplies bf16 matrices natively (CUDA with bf16, AMX, AVX512-BF16), else ``fp32``."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"


def pick_device(requested: str | None = None) -> torch.device:
    """``requested`` if given, else CUDA when present, else the CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it, fp32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def apply_chat_template_and_eos(tokenizer, generation_config=None) -> tuple[str, str, list[int]]:
    """Give ``tokenizer`` a chat template if it has none and point EOS at the end of turn.

    Args:
        tokenizer: a transformers tokenizer, modified in place.
        generation_config: if given, its ``eos_token_id`` / ``pad_token_id`` are set.

    Returns:
        (template source, end-of-turn token, EOS token ids for generation).
    """
    vocab = set(tokenizer.get_vocab())
    if tokenizer.chat_template:
        source = MODEL_TEMPLATE
        end_of_turn = end_of_turn_token(tokenizer.chat_template, vocab, tokenizer.eos_token)
    else:
        template = template_for_tokens(vocab, tokenizer.eos_token)
        tokenizer.chat_template = template.jinja
        source, end_of_turn = template.name, template.end_of_turn
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos_ids = [tokenizer.convert_tokens_to_ids(end_of_turn)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
    if generation_config is not None:
        generation_config.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]
        generation_config.pad_token_id = tokenizer.pad_token_id
    return source, end_of_turn, eos_ids


def load_tokenizer(path: Path):
    """Load the tokenizer of a model folder, with a chat template and a pad token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise TunesmithError(f"cannot load the tokenizer in {path}: {exc}",
                             "the folder needs tokenizer files written by save_pretrained") from exc
    apply_chat_template_and_eos(tokenizer)
    return tokenizer


def load_causal_lm(path: Path, *, device: torch.device | None = None, dtype: torch.dtype | None = None):
    """Load the causal LM in ``path`` on ``device`` (default: CUDA if present) in ``dtype``."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    device = device or pick_device()
    dtype = dtype or default_dtype(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise TunesmithError(f"cannot load the model in {path}: {exc}",
                             "the folder needs config.json and weights written by save_pretrained") from exc
    return model.to(device)
