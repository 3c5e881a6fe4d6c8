"""Linear layers for decode steps on a CPU: the product of a few rows in whichever form runs faster here.

A decode step multiplies every weight by a handful of rows (one per request in
the batch). ``F.linear`` computes ``x @ W^T``, and the BLAS then treats the weight
as the wide right-hand operand: on the CPUs measured it repacks it and runs at
7-9 GB/s of weight read for 2-8 rows. ``(W @ x^T)^T``, the same product with the
weight as the left-hand operand, streams it as a matrix-vector product does:
20-35 GB/s for 2-4 rows, 13-16 for 8 rows on most of SmolLM2's shapes, but
slower than ``F.linear`` for others (1536 -> 576 at 8 rows). Which form wins
depends on the BLAS, the CPU, the shape and the row count, so it is measured
once per model, on the model's own weights, for each weight shape and row count
up to :data:`CALIBRATED_ROWS`' last; more rows (prefill) always take ``F.linear``.
Both forms compute the same sums in a different order: equal to float rounding.
"""

from __future__ import annotations

import bisect
import functools
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

CALIBRATED_ROWS = (1, 2, 4, 8)  # a decode step of m rows uses the calibration of the next count up
CALIBRATION_BYTES = 64 * 2**20  # weights timed per shape: past the caches, as a decode step reads them
CALIBRATION_ROUNDS = 3
WINNING_MARGIN = 0.9  # the weight-first form must take under 90% of F.linear's time to be chosen


def use_fastest_decode_linears(model: torch.nn.Module, wins=None) -> dict[tuple[int, int], tuple[int, ...]]:
    """Time both forms on ``model``'s linear layers (CPU only) and route each layer's decode steps to the faster.

    Args:
        model: a model in memory; its ``nn.Linear`` layers on the CPU get the routing
            (peft's adapter matrices are left alone: batched LoRA does not call them).
        wins: ``wins(weights, rows) -> bool``, whether the weight-first form wins;
            default: timed (:func:`_weight_first_wins`).

    Returns:
        Per weight shape ``(out, in)``, the calibrated row counts at which the
        weight-first form was chosen (empty where ``F.linear`` stays).
    """
    wins = wins or _weight_first_wins
    groups: dict[tuple, list[torch.nn.Linear]] = defaultdict(list)
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and module.weight.device.type == "cpu" and ".lora_" not in name:
            groups[(tuple(module.weight.shape), module.weight.dtype)].append(module)
    chosen = {}
    for (shape, _dtype), modules in groups.items():
        rows = tuple(m for m in CALIBRATED_ROWS if wins([layer.weight for layer in modules], m))
        chosen[shape] = rows
        for module in modules:
            module.forward = functools.partial(_decode_forward, module, frozenset(rows))
    return chosen


def _decode_forward(module: torch.nn.Linear, weight_first_rows: frozenset, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    at = bisect.bisect_left(CALIBRATED_ROWS, rows)
    if at == len(CALIBRATED_ROWS) or CALIBRATED_ROWS[at] not in weight_first_rows or torch.is_grad_enabled():
        return F.linear(x, module.weight, module.bias)
    out = weight_first(x.reshape(rows, x.shape[-1]), module.weight, module.bias)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def weight_first(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for 2-D ``x``, computed as ``(weight @ x^T)^T`` (a transposed view)."""
    out = torch.mm(weight, x.T).T.contiguous()
    return out.add_(bias) if bias is not None else out


def _sample(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """Up to :data:`CALIBRATION_BYTES` of ``weights``: whole ones, or the leading rows of one too big."""
    sample, size = [], 0
    for weight in weights:
        room = (CALIBRATION_BYTES - size) // (weight.element_size() * weight.shape[1])
        if room <= 0:
            break
        sample.append(weight[:room])
        size += sample[-1].numel() * weight.element_size()
    return sample


@torch.inference_mode()
def _weight_first_wins(weights: list[torch.Tensor], rows: int) -> bool:
    """Whether the weight-first form multiplies ``rows`` rows by ``weights`` clearly faster than ``F.linear``."""
    sample = _sample(weights)
    x = torch.randn(rows, sample[0].shape[1], dtype=sample[0].dtype)
    best = {"linear": float("inf"), "weight_first": float("inf")}
    forms = {"linear": lambda w: F.linear(x, w), "weight_first": lambda w: weight_first(x, w, None)}
    for round_ in range(CALIBRATION_ROUNDS + 1):  # the forms take turns; round 0 warms up
        for name, form in forms.items():
            start = time.perf_counter()
            for weight in sample:
                form(weight)
            if round_:
                best[name] = min(best[name], time.perf_counter() - start)
    return best["weight_first"] < WINNING_MARGIN * best["linear"]
