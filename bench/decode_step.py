#!/usr/bin/env python
"""Decode step of the serving engine, side by side: F.linear against the calibrated decode linears.

Loads SmolLM2-135M-Instruct in the engine as ``tunesmith serve`` does, attaches 8
LoRA adapters (r=16, all linear layers, random weights) and times the engine's own
forward pass over decode steps for: the base at 1, 4 and 8 rows, 8 rows of one
adapter, and 8 rows of 8 different adapters. Each setup runs with every linear
layer on ``F.linear`` and with the forms the calibration chose
(``tunesmith.infer.decode_linear``), taking turns in one process; the table keeps
each one's best round and checks that both give the same greedy tokens.

    python bench/decode_step.py               # 3 rounds
    python bench/decode_step.py --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = "smollm2-135m"
PROMPT_TOKENS = 64
STEPS = 16


def make_adapters(base_path: Path, folder: Path, count: int) -> list[Path]:
    """``count`` LoRA adapters (r=16, all linear layers) with random non-zero ``B``, saved by peft."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tunesmith.models.loading import load_causal_lm

    paths = []
    for i in range(count):
        torch.manual_seed(i)
        model = load_causal_lm(base_path, device=torch.device("cpu"), dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.01)
        model.save_pretrained(folder / f"adapter-{i}")
        paths.append(folder / f"adapter-{i}")
    return paths


def decode(forward, adapters: list[str | None]) -> tuple[float, "torch.Tensor"]:
    """Median seconds of a decode step for ``adapters`` (one row each) after a prompt, and the greedy tokens."""
    import torch
    from transformers import DynamicCache

    rows = len(adapters)
    ids = torch.randint(100, 20000, (rows, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    cache, mask = DynamicCache(), torch.ones(rows, PROMPT_TOKENS, dtype=torch.long)
    logits = forward(ids, mask, torch.arange(PROMPT_TOKENS).expand(rows, -1), cache, adapters)
    tokens, times = [logits.argmax(-1)], []
    for step in range(STEPS):
        mask = torch.cat([mask, torch.ones(rows, 1, dtype=torch.long)], dim=1)
        started = time.perf_counter()
        logits = forward(tokens[-1][:, None], mask, torch.full((rows, 1), PROMPT_TOKENS + step), cache, adapters)
        times.append(time.perf_counter() - started)
        tokens.append(logits.argmax(-1))
    return statistics.median(times), torch.stack(tokens, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds, setups taking turns (best kept)")
    args = parser.parse_args()

    from tests.conftest import MODELS_CACHE

    os.environ.setdefault("TUNESMITH_MODELS_DIR", str(MODELS_CACHE))
    import torch

    from tunesmith.infer.engine import Engine, _forward_pass
    from tunesmith.models.store import resolve_model

    base_path = Path(resolve_model(MODEL).path)
    with tempfile.TemporaryDirectory(prefix="tunesmith-decode-bench-") as scratch:
        adapter_paths = make_adapters(base_path, Path(scratch), 8)
        engine = Engine(device="cpu")
        started = time.perf_counter()
        handle = engine.resolve(str(base_path))  # loads the base and calibrates its decode linears
        loaded = time.perf_counter() - started
        base = engine._bases[handle.base_key]
        names = [engine._attach(base, path) for path in adapter_paths]
    forward = _forward_pass(base, None)
    linears = [m for m in base.model.modules() if type(m) is torch.nn.Linear and "forward" in m.__dict__]
    chosen = {id(m): m.forward for m in linears}

    def use(calibrated: bool) -> None:
        for module in linears:
            if calibrated:
                module.forward = chosen[id(module)]
            else:
                del module.forward

    setups = {"base, 1 row": [None], "base, 4 rows": [None] * 4, "base, 8 rows": [None] * 8,
              "one adapter, 8 rows": [names[0]] * 8, "8 adapters, 8 rows": names}
    times: dict[tuple[str, bool], list[float]] = {}
    tokens = {}
    for number in range(args.rounds):
        print(f"round {number + 1}/{args.rounds}", flush=True)
        for label, rows in setups.items():
            for calibrated in (False, True):
                use(calibrated)
                seconds, tokens[(label, calibrated)] = decode(forward, rows)
                times.setdefault((label, calibrated), []).append(seconds)
    use(True)
    print(f"\nSmolLM2-135M fp32, {torch.get_num_threads()} torch threads; engine load with calibration "
          f"{loaded:.1f} s; decode step after a {PROMPT_TOKENS}-token prompt, median of {STEPS}, best of "
          f"{args.rounds} rounds\n")
    print("| setup | F.linear ms | calibrated ms | speed-up | same greedy tokens |")
    print("|---|---:|---:|---:|---|")
    for label in setups:
        plain, fast = min(times[(label, False)]), min(times[(label, True)])
        same = bool(torch.equal(tokens[(label, False)], tokens[(label, True)]))
        print(f"| {label} | {plain * 1e3:.1f} | {fast * 1e3:.1f} | {plain / fast:.2f}x | {same} |")
    one, mixed = min(times[("one adapter, 8 rows", True)]), min(times[("8 adapters, 8 rows", True)])
    base8 = min(times[("base, 8 rows", True)])
    print(f"\none adapter vs the base (8 rows): {one / base8 - 1:+.1%} per step; "
          f"8 adapters vs one: {mixed / one - 1:+.1%} per step")


if __name__ == "__main__":
    main()
