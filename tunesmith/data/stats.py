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
# The share of :func:`measure_matmul_flops`'s speed (fp32 on a CPU, bf16 on a GPU) that a training
# step reaches, in the units above (every trained token, as billed), per device and the precision
# the trainer picks there. CPU: bench/train_throughput.py with SmolLM2-135M (batches of 4 chats of
# 140-440 tokens) on a 2-core Xeon whose fp32 matmul runs at 396-429 GFLOP/s: LoRA fp32 0.54-0.58,
# full fp32 0.55-0.60; bf16 autocast (AMX) LoRA 0.86-0.92, full 0.78 of the fp32 speed; rounded
# down for machines that do worse.
# GPU: large models reach about a third of bf16 matmul speed; small ones far less (the step is
# launch-bound: 0.8% for Gemma 3 270M on an H200, bench/RESULTS_GPU.md), so a small model's GPU
# estimate is a lower bound.
TRAINING_EFFICIENCY = {("cpu", "fp32"): 0.45, ("cpu", "bf16"): 0.65, ("cuda", "fp32"): 0.3, ("cuda", "bf16"): 0.3}


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

    Takes about a tenth of a second; the result is cached per device.

    Returns:
        (FLOP/s, a description of the device).
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device in _FLOPS_CACHE:
        return _FLOPS_CACHE[device]
    size = 1536 if device == "cpu" else 4096  # 1024 on a CPU measures threading overhead: half the speed
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


def estimate_training_seconds(parameters: int, tokens: int, flops: float, device: str = "cpu",
                              precision: str = "fp32") -> dict[str, float]:
    """Seconds to train ``tokens`` tokens through a model of ``parameters``, per method.

    Args:
        parameters: the model's parameter count.
        tokens: tokens trained, all epochs together.
        flops: the device's matmul speed (:func:`measure_matmul_flops`).
        device: ``"cpu"`` or ``"cuda"``; with ``precision`` (``"fp32"`` or ``"bf16"``, the one the
            trainer's ``auto`` picks there) it chooses the efficiency factor.
    """
    efficiency = TRAINING_EFFICIENCY[("cpu" if device == "cpu" else "cuda", precision)]
    return {method: round(factor * parameters * tokens / (flops * efficiency), 1)
            for method, factor in FLOPS_PER_TOKEN_PER_PARAM.items()}
