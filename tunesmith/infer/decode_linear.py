"""Linear layers for decode steps on a CPU: the product of a few rows in whichever form runs faster here.

A decode step multiplies every weight by a handful of rows (one per request in
the batch), and ``F.linear`` serves that poorly on the CPUs measured: for one row
MKL's matrix-vector product runs on one thread (11-16 GB/s of weight read on the
AMD EPYC, the same with one thread or two), and for 2-8 rows its matrix product
repacks the weight first (7-12 GB/s). One ``bmm`` over the weight's row blocks,
one block per thread, streams the weight on every thread: 30-40 GB/s for one or
two rows, 23-26 for four, 13-16 for eight on most of SmolLM2's shapes, but slower
than ``F.linear`` for others (1536 -> 576 at 8 rows). Which form wins depends on
the BLAS, the CPU, the shape and the row count, so it is measured once per
model, on the model's own weights, for each weight shape and row count up to
:data:`CALIBRATED_ROWS`' last; more rows (prefill) always take ``F.linear``.
Both forms compute the same sums in a different order: equal to float rounding.
"""

from __future__ import annotations

import bisect
import functools
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

CALIBRATED_ROWS = (1, 2, 4, 8, 16)  # a decode step of m rows uses the calibration of the next count up
CALIBRATION_BYTES = 64 * 2**20  # weights timed per shape: past the caches, as a decode step reads them
CALIBRATION_ROUNDS = 3
WINNING_MARGIN = 0.9  # the split form must take under 90% of F.linear's time to be chosen


def use_fastest_decode_linears(model: torch.nn.Module, wins=None) -> dict[tuple[int, int], tuple[int, ...]]:
    """Time both forms on ``model``'s linear layers (CPU only) and route each layer's decode steps to the faster.

    Args:
        model: a model in memory; its ``nn.Linear`` layers on the CPU get the routing
            (peft's adapter matrices are left alone: batched LoRA does not call them).
        wins: ``wins(weights, rows, blocks) -> bool``, whether the split form wins;
            default: timed (:func:`_split_wins`).

    Returns:
        Per weight shape ``(out, in)``, the calibrated row counts at which the
        split form was chosen (empty where ``F.linear`` stays).
    """
    wins = wins or _split_wins
    blocks = torch.get_num_threads()
    groups: dict[tuple, list[torch.nn.Linear]] = defaultdict(list)
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and module.weight.device.type == "cpu" and ".lora_" not in name:
            groups[(tuple(module.weight.shape), module.weight.dtype)].append(module)
    chosen = {}
    for (shape, _dtype), modules in groups.items():
        weights = [layer.weight for layer in modules]
        splittable = blocks > 1 and shape[0] % blocks == 0 and all(w.is_contiguous() for w in weights)
        rows = tuple(m for m in CALIBRATED_ROWS if splittable and wins(weights, m, blocks))
        chosen[shape] = rows
        for module in modules:
            module.forward = functools.partial(_decode_forward, module, frozenset(rows), blocks)
    return chosen


def _decode_forward(module: torch.nn.Linear, split_rows: frozenset, blocks: int, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    at = bisect.bisect_left(CALIBRATED_ROWS, rows)
    if at == len(CALIBRATED_ROWS) or CALIBRATED_ROWS[at] not in split_rows or torch.is_grad_enabled():
        return F.linear(x, module.weight, module.bias)
    out = split_linear(x.reshape(rows, x.shape[-1]), module.weight, module.bias, blocks)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def split_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, blocks: int) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for 2-D ``x``: one ``bmm`` of ``blocks`` row blocks of ``weight`` by ``x^T``.

    ``bmm`` runs its batch across the threads, so each thread streams its own block
    of the weight. ``weight`` must be contiguous with rows divisible by ``blocks``.
    """
    size_out, size_in = weight.shape
    products = torch.bmm(weight.view(blocks, size_out // blocks, size_in),
                         x.T.unsqueeze(0).expand(blocks, size_in, x.shape[0]))
    out = products.view(size_out, x.shape[0]).T.contiguous()
    return out.add_(bias) if bias is not None else out


def _sample(weights: list[torch.Tensor], blocks: int) -> list[torch.Tensor]:
    """Up to :data:`CALIBRATION_BYTES` of ``weights``: whole ones, or leading rows (a multiple of ``blocks``)."""
    sample, size = [], 0
    for weight in weights:
        room = (CALIBRATION_BYTES - size) // (weight.element_size() * weight.shape[1]) // blocks * blocks
        if room <= 0:
            break
        sample.append(weight[:room])
        size += sample[-1].numel() * weight.element_size()
    return sample


@torch.inference_mode()
def _split_wins(weights: list[torch.Tensor], rows: int, blocks: int) -> bool:
    """Whether the split form multiplies ``rows`` rows by ``weights`` clearly faster than ``F.linear``."""
    sample = _sample(weights, blocks)
    x = torch.randn(rows, sample[0].shape[1], dtype=sample[0].dtype)
    best = {"linear": float("inf"), "split": float("inf")}
    forms = {"linear": lambda w: F.linear(x, w), "split": lambda w: split_linear(x, w, None, blocks)}
    for round_ in range(CALIBRATION_ROUNDS + 1):  # the forms take turns; round 0 warms up
        for name, form in forms.items():
            start = time.perf_counter()
            for weight in sample:
                form(weight)
            if round_:
                best[name] = min(best[name], time.perf_counter() - start)
    return best["split"] < WINNING_MARGIN * best["linear"]
