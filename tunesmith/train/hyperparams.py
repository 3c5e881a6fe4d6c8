"""Resolve "auto" hyperparameters the way the hosted fine-tuning APIs do.

The rules (also in docs/training.md):

- **epochs**: from the number of training examples (``tunesmith.data.stats.auto_epochs``):
  more passes over a small set, fewer over a large one.
- **batch size**: grows with the dataset, ``2**floor(log2(n / 32))`` (1 up to 63
  examples, 2 up to 127, 4 up to 255, ...), capped at 32 and by memory: a
  sequence of ``max_length`` tokens costs about its logits (``max_length × vocab ×
  4 bytes × 3``: logits, their fp32 softmax and gradient) plus activations
  (``max_length × hidden × layers × 34 bytes``); the batch must fit in 40% of
  the free memory of the device.
- **learning rate**: the method's base rate times ``learning_rate_multiplier``
  ("auto" = 1). Base rates: LoRA family 2e-4 at any size (alpha/r already sets
  the adapter's scale); full fine-tuning 2e-5 for models up to 100M parameters,
  scaled by ``sqrt(100M / parameters)`` above that (135M → 1.7e-5, 1B → 6.3e-6,
  7B → 2.4e-6): bigger models need smaller steps when every weight moves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tunesmith.train.config import AUTO, TrainConfig

MAX_AUTO_BATCH = 32
MEMORY_FRACTION = 0.4
REFERENCE_PARAMETERS = 100_000_000


@dataclass
class ModelShape:
    """The sizes that memory and learning-rate rules depend on."""

    parameters: int
    vocab_size: int
    hidden_size: int
    layers: int


def model_shape(model: torch.nn.Module) -> ModelShape:
    """Read the sizes of a loaded causal LM (a peft wrapper included)."""
    config = model.config
    text = getattr(config, "text_config", None) or config
    parameters = sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)
    return ModelShape(parameters=parameters, vocab_size=int(text.vocab_size),
                      hidden_size=int(text.hidden_size), layers=int(text.num_hidden_layers))


def resolve_epochs(config: TrainConfig, n_examples: int) -> int:
    """``config.epochs``, or the dataset-size rule when "auto"."""
    if config.epochs != AUTO:
        return int(config.epochs)
    from tunesmith.data.stats import auto_epochs

    return int(auto_epochs(n_examples))


def bytes_per_sequence(shape: ModelShape, max_length: int) -> int:
    """Rough training memory of one sequence of ``max_length`` tokens."""
    logits = max_length * shape.vocab_size * 4 * 3
    activations = max_length * shape.hidden_size * shape.layers * 34
    return logits + activations


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` (the GPU's free memory, or the machine's available RAM)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def resolve_batch_size(config: TrainConfig, n_examples: int, shape: ModelShape, device: torch.device) -> int:
    """``config.batch_size``, or the dataset-size rule capped by memory when "auto"."""
    if config.batch_size != AUTO:
        return int(config.batch_size)
    by_size = 2 ** max(0, math.floor(math.log2(max(1, n_examples) / 32))) if n_examples >= 32 else 1
    by_memory = max(1, int(free_memory(device) * MEMORY_FRACTION // bytes_per_sequence(shape, config.max_length)))
    return max(1, min(by_size, MAX_AUTO_BATCH, by_memory, n_examples))


def resolve_learning_rate(config: TrainConfig, base_learning_rate: float, is_adapter: bool,
                          shape: ModelShape) -> tuple[float, float]:
    """(multiplier, learning rate) for the method and model size.

    Returns:
        The resolved multiplier ("auto" = 1.0) and the learning rate it gives.
    """
    multiplier = 1.0 if config.learning_rate_multiplier == AUTO else float(config.learning_rate_multiplier)
    size_factor = 1.0
    if not is_adapter and shape.parameters > REFERENCE_PARAMETERS:
        size_factor = math.sqrt(REFERENCE_PARAMETERS / shape.parameters)
    return multiplier, base_learning_rate * size_factor * multiplier
