"""Statistics of a training file: token counts, default epochs, billed tokens, time estimate.

Everything here is constant in memory: token lengths go into a histogram
(exact quantiles from integer counts), never a list of all lengths.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

DEFAULT_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100     # tiny sets get more epochs, so ~100 example-passes happen …
MAX_AUTO_EPOCHS = 10          # … but never more than this many
MAX_TARGET_EXAMPLES = 25_000  # large sets get fewer epochs (at least 1), so ~25k example-passes at most

# Training cost per token, in multiples of the parameter count: forward 2N, backward 4N for full
# fine-tuning; LoRA skips the weight gradients of the frozen base (backward ~2N).
FLOPS_PER_TOKEN_PER_PARAM = {"full": 6.0, "lora": 4.0}
# The share of a plain matrix multiply's speed that a small model's training step reaches: norms,
# activations, the softmax over a large vocabulary, the optimizer and Python overhead eat the rest.
# CPU: measured with smollm2-135m (fp32, 4x256-token batches, full and LoRA) against a 1024x1024
# fp32 matmul on the same machine: 0.10-0.34 of the matmul speed, 0.15 typical. GPU: small models
# reach about a third of bf16 matmul speed (an assumption, not a measurement on this project's runs).
TRAINING_EFFICIENCY = {"cpu": 0.15, "cuda": 0.3}


def auto_epochs(n_examples: int) -> int:
    """The number of epochs ``"auto"`` means for a file of ``n_examples`` (OpenAI's rule of thumb).

    3 by default; more for tiny sets so that about 100 examples are seen (at most 10 epochs);
    fewer for large sets so that about 25,000 are (at least 1).
    """
    if n_examples <= 0:
        return DEFAULT_EPOCHS
    if n_examples * DEFAULT_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_AUTO_EPOCHS, math.ceil(MIN_TARGET_EXAMPLES / n_examples))
    if n_examples * DEFAULT_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(1, MAX_TARGET_EXAMPLES // n_examples)
    return DEFAULT_EPOCHS


@dataclass
class LengthHistogram:
    """Counts of example lengths; exact min/median/p95/max in memory bounded by distinct lengths."""

    counts: Counter = field(default_factory=Counter)
    total: int = 0
    n: int = 0

    def add(self, length: int) -> None:
        self.counts[length] += 1
        self.total += length
        self.n += 1

    def quantile(self, q: float) -> int:
        """The smallest length with at least a ``q`` share of examples at or below it (nearest rank)."""
        if not self.n:
            return 0
        rank = max(1, math.ceil(q * self.n))
        seen = 0
        for length in sorted(self.counts):
            seen += self.counts[length]
            if seen >= rank:
                return length
        return max(self.counts)


@dataclass
class DataStats:
    """The statistics ``data check`` reports (JSON-ready via :meth:`to_dict`)."""

    examples: int
    tokens_min: int
    tokens_median: int
    tokens_p95: int
    tokens_max: int
    total_tokens: int           # tokens trained per epoch (after truncation)
    trainable_tokens: int       # of which carry loss (assistant tokens of weight 1)
    max_length: int             # the per-example limit applied (model context or --max-length)
    truncated_examples: int
    truncated_tokens: int
    epochs: int                 # the default ("auto") number of epochs
    billed_tokens: int          # total_tokens x epochs, as the hosted APIs bill
    estimated_seconds: dict[str, float]  # per method ("lora", "full") on this machine
    estimate_device: str

    def to_dict(self) -> dict:
        return asdict(self)


def measure_matmul_flops(device: str | None = None) -> tuple[float, str]:
    """This machine's speed at a float32 (CPU) or bfloat16 (GPU) matrix multiply, in FLOP/s.

    Takes a few hundredths of a second; the result is cached per device.

    Returns:
        (FLOP/s, a description of the device).
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device in _FLOPS_CACHE:
        return _FLOPS_CACHE[device]
    size = 1024 if device == "cpu" else 4096
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(3):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    name = torch.cuda.get_device_name() if device != "cpu" else f"CPU, {torch.get_num_threads()} threads"
    _FLOPS_CACHE[device] = (2 * size**3 / best, name)
    return _FLOPS_CACHE[device]


_FLOPS_CACHE: dict[str, tuple[float, str]] = {}


def estimate_training_seconds(parameters: int, tokens: int, flops: float, device: str = "cpu") -> dict[str, float]:
    """Seconds to train ``tokens`` tokens through a model of ``parameters``, per method.

    Args:
        parameters: the model's parameter count.
        tokens: tokens trained, all epochs together.
        flops: the device's matmul speed (:func:`measure_matmul_flops`).
        device: ``"cpu"`` or ``"cuda"`` (picks the efficiency factor).
    """
    efficiency = TRAINING_EFFICIENCY["cpu" if device == "cpu" else "cuda"]
    return {method: round(factor * parameters * tokens / (flops * efficiency), 1)
            for method, factor in FLOPS_PER_TOKEN_PER_PARAM.items()}
