#!/usr/bin/env python
"""Training throughput, side by side: tunesmith's recipe against the recipes users would otherwise run.

On one generated chat data set and one model, each in its own subprocess (so peak
RSS is its own), with the same batches in the same order and the same
hyperparameters:

- ``trainer``: transformers ``Trainer`` (+ PEFT LoRA r=16 on all linear layers), a
  pad-to-longest collator and assistant-only labels: what most tutorials run;
- ``trl``: TRL's ``SFTTrainer`` with its default settings (bf16 autocast and
  gradient checkpointing on; loss on every token, so its loss is not comparable);
- ``tunesmith``: ``tunesmith.train.recipe.train`` as a user runs it (packed batches,
  per-example attention, output layer on labelled tokens only: ``tunesmith.train.fast``),
  at the precision of the row (``--precision fp32`` or ``bf16``; the recipe's ``auto``
  picks bf16 on CPUs with AMX or AVX512-BF16).

For each: real (non-padding) tokens/s over the timed steps (the first
``WARMUP_STEPS`` are not timed), peak RSS, the loss after the same number of
steps, and MFU against a matmul peak measured in the same run. Then tokens/s at
max lengths 256/512/1024 and on gemma3-270m (262k vocabulary).

    python bench/train_throughput.py            # everything; writes bench/RESULTS.md
    python bench/train_throughput.py --quick    # a few steps of a few cases: a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from chatdata import make_conversations, tokenize_conversation  # noqa: E402

BATCH_SIZE = 4
WARMUP_STEPS = 2
SEED = 42
LEARNING_RATE = {"lora": 2e-4, "full": 2e-5}  # the recipe's base rates; see learning_rate()
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}  # the recipe's defaults
WARMUP_RATIO = 0.05
TRL_STEPS = 4  # TRL's defaults (gradient checkpointing, loss on every token) are slow on a CPU: a few steps tell


@dataclass(frozen=True)
class Case:
    """One measured configuration."""

    group: str  # main | length | gemma
    runner: str  # trainer | trl | tunesmith
    method: str  # lora | full
    precision: str  # fp32 | bf16
    model: str = "smollm2-135m"
    min_len: int = 140
    max_len: int = 440
    steps: int = 16
    device: str = "cpu"

    @property
    def label(self) -> str:
        label = f"{self.group}/{self.model}/{self.max_len}/{self.method}/{self.runner}/{self.precision}"
        return label if self.device == "cpu" else f"{label}/{self.device}"


def all_cases(steps: int, quick: bool, device: str = "cpu") -> list[Case]:
    """The full comparison, or a smoke subset with ``quick``; on a GPU, Gemma 3 270M's rows."""
    if device != "cpu":
        return gpu_cases(steps, device)
    if quick:
        return [Case("main", runner, "lora", "fp32", steps=steps) for runner in ("trainer", "tunesmith")]
    cases = []
    for method in ("lora", "full"):
        cases += [Case("main", "trainer", method, "fp32", steps=steps),
                  Case("main", "trainer", method, "bf16", steps=steps),
                  Case("main", "trl", method, "bf16", steps=TRL_STEPS),
                  Case("main", "tunesmith", method, "fp32", steps=steps),
                  Case("main", "tunesmith", method, "bf16", steps=steps)]
    for max_len in (256, 512, 1024):
        short = max(4, steps // 2)
        for runner, precision in (("trainer", "fp32"), ("tunesmith", "fp32"), ("tunesmith", "bf16")):
            cases.append(Case("length", runner, "lora", precision, min_len=int(max_len * 0.32), max_len=max_len,
                              steps=short))
    for runner, precision in (("trainer", "fp32"), ("trainer", "bf16"), ("tunesmith", "fp32"),
                              ("tunesmith", "bf16")):
        cases.append(Case("gemma", runner, "lora", precision, model="gemma3-270m", steps=max(4, steps // 2)))
    return cases


def gpu_cases(steps: int, device: str) -> list[Case]:
    """On a GPU: Gemma 3 270M, LoRA and full, the Trainer in fp32 and bf16, TRL, tunesmith in bf16 and fp32."""
    cases = []
    for method in ("lora", "full"):
        for runner, precision in (("trainer", "fp32"), ("trainer", "bf16"), ("trl", "bf16"), ("tunesmith", "fp32"),
                                  ("tunesmith", "bf16")):
            cases.append(Case("gpu", runner, method, precision, model="gemma3-270m", steps=steps, device=device))
    return cases


def learning_rate(case: Case) -> float:
    """The rate the recipe resolves for ``case`` (full fine-tuning scales down past its reference size)."""
    from tunesmith.models.store import resolve_model
    from tunesmith.train.hyperparams import REFERENCE_PARAMETERS

    if case.method == "lora":
        return LEARNING_RATE["lora"]
    info = resolve_model(case.model).info
    parameters = info.parameters if info is not None else REFERENCE_PARAMETERS
    return LEARNING_RATE["full"] * min(1.0, math.sqrt(REFERENCE_PARAMETERS / parameters))


# ============================================================================ data


def dataset(case: Case, tokenizer) -> tuple[list[dict], list[tuple[list[int], list[int]]], list[int]]:
    """(conversations, their tokens and labels, the recipe's epoch-0 order): the same for every runner."""
    from tunesmith.train.batches import epoch_order

    n = case.steps * BATCH_SIZE
    conversations = make_conversations(n, min_len=case.min_len, max_len=case.max_len, seed=case.max_len)
    encoded = [tokenize_conversation(tokenizer, c["messages"]) for c in conversations]
    return conversations, encoded, epoch_order(n, SEED, 0)


# ============================================================================ children: one case each


def run_child(case: Case) -> dict:
    """Train ``case`` for its steps in this process; returns the measurements."""
    import torch

    from tunesmith.models.loading import load_tokenizer
    from tunesmith.models.store import resolve_model

    peak_before = matmul_peak(case.device, (case.precision,))[case.precision]
    torch.manual_seed(SEED)
    path = resolve_model(case.model).path
    tokenizer = load_tokenizer(path)
    conversations, encoded, order = dataset(case, tokenizer)
    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-") as scratch:
        if case.runner in ("trainer", "trl"):
            out = run_hf(case, path, tokenizer, conversations, encoded, order, Path(scratch))
        else:
            out = run_recipe(case, conversations, Path(scratch))
    ends, tokens = out["ends"], out["step_tokens"]
    timed = slice(WARMUP_STEPS, None)
    seconds = ends[-1] - ends[WARMUP_STEPS - 1]
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if case.device.startswith("cuda") else None
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_after = matmul_peak(case.device, (case.precision,))[case.precision]
    return {
        "peak_gpu_mib": gpu_peak,
        # this process's own matmul peak, before and after its steps: the machine's speed drifts
        # by a third within an hour here, and MFU against a peak taken at another moment drifts with it
        "matmul_peak": max(peak_before, peak_after),
        "tokens": sum(tokens[timed]),
        "seconds": seconds,
        "tokens_per_s": sum(tokens[timed]) / seconds,
        "losses": out["losses"],
        "peak_rss_mib": peak_rss,
        "step_seconds": [round(b - a, 3) for a, b in zip(ends, ends[1:])],
        "first_step_s": out.get("first_step_s"),
    }


def run_hf(case: Case, path: Path, tokenizer, conversations, encoded, order, scratch: Path) -> dict:
    """transformers Trainer (+PEFT) or TRL SFTTrainer on the batches in the recipe's order."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback

    clock: dict[str, list] = {"ends": [], "losses": [], "step_tokens": []}

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock["ends"].append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                clock["losses"].append(float(logs["loss"]))

    def counting(trainer_class):
        class Counting(trainer_class):
            def training_step(self, model, inputs, num_items_in_batch=None):
                mask = inputs.get("attention_mask")
                clock["step_tokens"].append(int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()))
                return super().training_step(model, inputs, num_items_in_batch)
        return Counting

    lora = LoraConfig(task_type="CAUSAL_LM", **LORA) if case.method == "lora" else None
    common = dict(output_dir=str(scratch / "out"), per_device_train_batch_size=BATCH_SIZE, max_steps=case.steps,
                  learning_rate=learning_rate(case), logging_steps=1, save_strategy="no", report_to="none",
                  train_sampling_strategy="sequential", seed=SEED, use_cpu=case.device == "cpu", disable_tqdm=True,
                  dataloader_num_workers=0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if case.runner == "trainer":
        from peft import get_peft_model
        from transformers import TrainingArguments

        if lora is not None:
            model = get_peft_model(model, lora)
        args = TrainingArguments(**common, lr_scheduler_type="cosine", warmup_steps=math.ceil(WARMUP_RATIO * case.steps),
                                 bf16=case.precision == "bf16", weight_decay=0.0, max_grad_norm=1.0)
        rows = [{"input_ids": encoded[i][0], "labels": encoded[i][1]} for i in order]
        trainer = counting(Trainer)(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                    data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest"),
                                    callbacks=[StepClock()])
    else:
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**common)  # TRL's defaults otherwise: bf16, gradient checkpointing, linear schedule
        rows = [conversations[i] for i in order]
        trainer = counting(SFTTrainer)(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                       processing_class=tokenizer, peft_config=lora, callbacks=[StepClock()])
    started = time.perf_counter()
    trainer.train()
    clock["first_step_s"] = clock["ends"][0] - started
    return clock


def run_recipe(case: Case, conversations, scratch: Path) -> dict:
    """tunesmith's recipe on a JSONL file of the same conversations (it orders them itself)."""
    from tunesmith.train.config import TrainConfig
    from tunesmith.train.recipe import train

    data = scratch / "train.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in conversations), encoding="utf-8")
    clock: dict[str, list] = {"ends": [], "losses": [], "tokens": []}

    def on_event(event):
        if event.kind == "metrics":
            clock["ends"].append(time.perf_counter())
            clock["losses"].append(float(event.data["train_loss"]))
            clock["tokens"].append(int(event.data["tokens"]))

    config = TrainConfig(model=case.model, data=str(data), method=case.method, epochs=1, batch_size=BATCH_SIZE,
                         learning_rate_multiplier=1.0, max_length=4096, seed=SEED, out=str(scratch / "run"),
                         warmup_ratio=WARMUP_RATIO, schedule="cosine", device=case.device, precision=case.precision,
                         **({"lora_r": LORA["r"], "lora_alpha": LORA["lora_alpha"],
                             "lora_dropout": LORA["lora_dropout"]} if case.method == "lora" else {}))
    started = time.perf_counter()
    result = train(config, on_event=on_event)
    if abs(result.resolved["learning_rate"] - learning_rate(case)) > 1e-12:
        raise SystemExit(f"the recipe resolved learning rate {result.resolved['learning_rate']}, "
                         f"the baselines use {learning_rate(case)}")
    tokens = clock["tokens"]
    clock["step_tokens"] = [b - a for a, b in zip([0] + tokens, tokens)]
    clock["first_step_s"] = clock["ends"][0] - started
    return clock


# ============================================================================ peak, FLOPs, machine


def matmul_peak(device: str = "cpu", precisions: tuple[str, ...] = ("fp32", "bf16")) -> dict:
    """Best GEMM rate (GFLOP/s) in each of ``precisions`` over a few square and model-shaped products."""
    import torch

    shapes = [(2048, 2048, 2048), (4096, 4096, 4096), (1152, 576, 1536), (1152, 1536, 576)]
    if device != "cpu":
        shapes.append((8192, 8192, 8192))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    peak = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if name not in precisions:
            continue
        best = 0.0
        for m, k, n in shapes:
            a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
            for _ in range(2):
                a @ b
            for _ in range(5):
                sync()
                started = time.perf_counter()
                a @ b
                sync()
                best = max(best, 2 * m * k * n / (time.perf_counter() - started) / 1e9)
        peak[name] = best
    return peak


def model_flops(model: str, examples: list[tuple[list[int], list[int]]], method: str) -> float:
    """Useful training FLOPs for ``examples``: padding and the output layer at unlabelled positions excluded.

    Forward: 2 x (matmul weights) per token, causal attention ``2 x heads x head_dim x L^2`` per
    layer and example, the output layer ``2 x d x vocab`` per labelled token, LoRA adapters
    ``2 x r x (in + out)`` per module and token. Backward: twice the forward for what trains and
    for attention; once (gradients of the inputs only) for frozen weights.
    """
    from transformers import AutoConfig

    from tunesmith.models.store import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(model).path)
    config = getattr(config, "text_config", config)
    d, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    shapes = [(d, heads * head_dim), (d, kv_heads * head_dim), (d, kv_heads * head_dim), (heads * head_dim, d),
              (d, inter), (d, inter), (inter, d)]
    weights = layers * sum(i * o for i, o in shapes)
    adapters = layers * sum(LORA["r"] * (i + o) for i, o in shapes) if method == "lora" else 0
    frozen_factor = 2 if method == "lora" else 3  # forward + input grads (+ weight grads when training)
    total = 0.0
    for ids, labels in examples:
        n = len(ids)
        labelled = sum(1 for label in labels[1:] if label != -100)
        total += frozen_factor * 2 * weights * n
        total += 3 * 2 * adapters * n
        total += 3 * layers * 2 * heads * head_dim * n * n
        total += frozen_factor * 2 * d * config.vocab_size * labelled
    return total


def machine(device: str = "cpu") -> dict:
    """CPU model, cores, the GPU (when measuring on one) and library versions."""
    import importlib.metadata as md

    model = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    import torch

    from tunesmith.models.loading import cpu_has_amx

    flags = []
    if cpu_has_amx():
        flags.append("AMX")
    if torch.cpu._is_avx512_bf16_supported():
        flags.append("AVX512-BF16")
    versions = {}
    for package in ("torch", "transformers", "peft", "trl", "accelerate"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = "not installed"
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "bf16_units": flags,
            "gpu": gpu, "python": platform.python_version(), "versions": versions}


# ============================================================================ parent: run, compare, report


def run_case_in_subprocess(case: Case) -> dict:
    """Run one case in a fresh interpreter; returns its measurements or the error."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(asdict(case))]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return {**json.loads(line[len("RESULT "):]), "wall_s": wall}
    tail = (done.stderr or done.stdout).strip().splitlines()
    print("\n".join(tail[-20:]), file=sys.stderr, flush=True)  # the traceback, for whoever runs the bench
    return {"error": tail[-1:] or ["no output"], "wall_s": wall}


def best_of(runs: list[dict]) -> dict:
    """The fastest of a case's runs (other work on a shared machine only ever slows a run)."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[-1]
    best = max(good, key=lambda r: r["tokens_per_s"])
    return {**best, "runs": [round(r["tokens_per_s"], 1) for r in good]}


def attach_flops(case: Case, result: dict) -> None:
    """MFU of a measured case: its useful FLOPs over the timed steps against the same-precision peak
    its own process measured."""
    from tunesmith.models.loading import load_tokenizer
    from tunesmith.models.store import resolve_model

    tokenizer = load_tokenizer(resolve_model(case.model).path)
    _conversations, encoded, order = dataset(case, tokenizer)
    timed = [encoded[i] for i in order[WARMUP_STEPS * BATCH_SIZE:]]
    flops = model_flops(case.model, timed, case.method)
    result["gflops_per_s"] = flops / result["seconds"] / 1e9
    result["mfu"] = result["gflops_per_s"] / result["matmul_peak"]


def final_loss(result: dict) -> float | None:
    """Mean training loss of the last four steps (the same batches for every runner)."""
    losses = result.get("losses") or []
    return statistics.fmean(losses[-4:]) if losses else None


def ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value and base else "-"


def render(cases: list[Case], results: dict[str, dict], peak: dict, info: dict, command: str,
           started: str, loads: tuple) -> str:
    """bench/RESULTS.md."""
    def get(case: Case) -> dict:
        return results.get(case.label, {})

    def baseline(case: Case, precision: str) -> dict:
        return get(replace(case, runner="trainer", precision=precision))

    load_note = "" if loads is None else f"load average {loads[0]:.2f} at the start, {loads[1]:.2f} at the end; "
    lines = [
        "# Training throughput",
        "",
        f"Measured {started} with `{command}` ({load_note}each row gives its own time and the 1-minute load "
        "average after it: other work on the machine slows every runner alike only if it is steady).",
        "",
        f"- Machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), "
        f"bf16 units: {', '.join(info['bf16_units']) or 'none'}; Python {info['python']}"
        + (f"; GPU: {info['gpu']}." if info.get("gpu") else "."),
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + ".",
        f"- Matmul peak measured at the start of the invocation: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 "
        f"{peak['bf16']:.0f} GFLOP/s. Each row's MFU uses the peak its own process measured just before and "
        "after its steps (the higher of the two), in the row's precision.",
        f"- Batches of {BATCH_SIZE} generated chat examples (system + user + assistant, the answer 20-40% of the "
        "tokens), loss on the assistant answer only; the same batches in the same order for every runner; "
        f"LoRA r={LORA['r']} alpha={LORA['lora_alpha']} dropout={LORA['lora_dropout']} on all linear layers, "
        f"learning rate {LEARNING_RATE['lora']} (LoRA) / {LEARNING_RATE['full']} scaled by the recipe's size rule "
        "(full), cosine schedule, 5% warm-up.",
        f"- tokens/s counts real (non-padding) tokens over the steps after the first {WARMUP_STEPS} (with "
        "`--repeat N`, the fastest of N runs of the case, each in a fresh process, the cases taking turns round "
        "after round); peak RSS is "
        "each run's own process; loss is the mean training loss of the last 4 steps; MFU counts the useful "
        "FLOPs (no padding, output layer at labelled positions only) against that matmul peak.",
        "- Ratios: `vs Trainer` compares with the Trainer at the same precision, `vs Trainer fp32` with the "
        "fp32 Trainer.",
        "",
    ]
    titles = {"main": "SmolLM2-135M-Instruct, sequences of 140-440 tokens",
              "length": "Cost by sequence length (LoRA, SmolLM2-135M-Instruct)",
              "gemma": "Gemma 3 270M (262k vocabulary), LoRA, sequences of 140-440 tokens",
              "gpu": f"Gemma 3 270M (262k vocabulary) on the GPU ({info.get('gpu')}), sequences of 140-440 tokens"}
    for group in ("main", "length", "gemma", "gpu"):
        members = [c for c in cases if c.group == group]
        if not members:
            continue
        memory = "peak GPU MiB" if group == "gpu" else "peak RSS MiB"
        lines += [f"## {titles[group]}", "",
                  "| max len | method | runner | precision | real tokens/s | vs Trainer | vs Trainer fp32 | "
                  f"{memory} | loss | loss vs Trainer | MFU | steps | measured (load avg) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for case in members:
            r = get(case)
            if "error" in r or not r:
                lines.append(f"| {case.max_len} | {case.method} | {case.runner} | {case.precision} | "
                             f"failed: {' '.join(r.get('error', ['not run']))[:120]} |||||||| ")
                continue
            same, fp32 = baseline(case, case.precision), baseline(case, "fp32")
            loss, base_loss = final_loss(r), final_loss(same)
            loss_delta = (f"{(loss / base_loss - 1) * 100:+.1f}%" if loss and base_loss and case.runner != "trl"
                          else ("all tokens" if case.runner == "trl" else "-"))
            lines.append(
                f"| {case.max_len} | {case.method} | {case.runner} | {case.precision} | {r['tokens_per_s']:.0f} | "
                f"{ratio(r['tokens_per_s'], same.get('tokens_per_s'))} | "
                f"{ratio(r['tokens_per_s'], fp32.get('tokens_per_s'))} | "
                f"{(r.get('peak_gpu_mib') or 0) if group == 'gpu' else r['peak_rss_mib']:.0f} | "
                f"{loss:.4f} | {loss_delta} | {r['mfu'] * 100:.0f}% | {r.get('steps', case.steps)} | "
                f"{r.get('measured', '-')} ({r.get('load', '-')}) |")
        lines.append("")
    return "\n".join(lines)


NOTES_MARKER = "<!-- notes: kept when the tables are regenerated -->"


def check_same_machine(saved: dict, current: dict, path: Path) -> None:
    """Exits unless ``current`` is the machine ``saved`` results were measured on (``--merge``).

    Ratios only hold within one machine: rows from another CPU in the same table would
    pair one machine's baseline with another's tunesmith.
    """
    keys = ("cpu", "cores", "bf16_units", "gpu")
    if any(saved.get(key) != current.get(key) for key in keys):
        theirs = ", ".join(str(saved.get(key)) for key in keys)
        ours = ", ".join(str(current.get(key)) for key in keys)
        raise SystemExit(f"--merge: {path} was measured on {theirs}, this machine is {ours}; "
                         "write this machine's table elsewhere with --out FILE.md")


def kept_notes(path: Path) -> str:
    """The hand-written analysis below the tables of an existing RESULTS.md (kept across runs)."""
    if not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8")
    return text[text.index(NOTES_MARKER):] if NOTES_MARKER in text else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 4 steps, LoRA, Trainer vs tunesmith")
    parser.add_argument("--steps", type=int, default=None, help="steps per case in the main group (default 16)")
    parser.add_argument("--only", default=None, help="comma-separated substrings; run the cases whose label has one")
    parser.add_argument("--out", default=None, help="where to write the table (default bench/RESULTS.md; "
                        "none with --quick or --only)")
    parser.add_argument("--merge", action="store_true", help="add to the results already in --out's .json "
                        "(cases measured again replace theirs) instead of starting a new table")
    parser.add_argument("--report", action="store_true", help="only rewrite --out from its .json (no runs)")
    parser.add_argument("--repeat", type=int, default=1, help="run the cases N rounds, taking turns, and keep each one's fastest "
                        "(steadier ratios on a shared machine)")
    parser.add_argument("--device", default="cpu", help="cpu (default), or cuda: Gemma 3 270M's rows on the GPU, "
                        "written to bench/RESULTS_GPU.md")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.child:
        result = run_child(Case(**json.loads(args.child)))
        print("RESULT " + json.dumps(result), flush=True)
        return
    steps = args.steps or (4 if args.quick else 16)
    default_out = HERE / ("RESULTS.md" if args.device == "cpu" else "RESULTS_GPU.md")
    if args.report:
        out = Path(args.out or default_out)
        saved = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
        shown = [c for c in all_cases(steps, False, args.device) if c.label in saved["results"]]
        times = sorted(r.get("measured", "") for r in saved["results"].values())
        report = render(shown, saved["results"], saved["peak"], saved["machine"],
                        "python bench/train_throughput.py --merge --steps N --only CASES",
                        f"between {times[0]} and {times[-1]} in several invocations", None)
        out.write_text(report + "\n" + kept_notes(out), encoding="utf-8")
        print(report)
        return
    if args.device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: no CUDA GPU is available here; leave --device out to run on the CPU")
    cases = all_cases(steps, args.quick, args.device)
    if args.only:
        wanted = args.only.split(",")
        cases = [c for c in cases if any(w in c.label for w in wanted)]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_start = os.getloadavg()[0]
    info = machine(args.device)
    peak = matmul_peak(args.device)
    print(f"{info['cpu']}, {info['cores']} cores; matmul peak fp32 {peak['fp32']:.0f} GFLOP/s, "
          f"bf16 {peak['bf16']:.0f} GFLOP/s", flush=True)
    out = args.out or (None if (args.quick or (args.only and not args.merge)) else str(default_out))
    results: dict[str, dict] = {}
    raw = Path(out).with_suffix(".json") if out else None
    if args.merge and raw is not None and raw.is_file():
        saved = json.loads(raw.read_text(encoding="utf-8"))
        check_same_machine(saved["machine"], info, raw)
        results = saved["results"]
    runs: dict[str, list[dict]] = {case.label: [] for case in cases}
    # With --repeat, the cases take turns (round after round) rather than running N times in a row:
    # a slow spell of a shared machine then hits every runner, not one case's repeats.
    for case in [case for _ in range(args.repeat) for case in cases]:
        run = run_case_in_subprocess(case)
        run.update(load=round(os.getloadavg()[0], 1), measured=time.strftime("%H:%M UTC", time.gmtime()))
        runs[case.label].append(run)
        result = best_of(runs[case.label])  # with the time and load of its own run
        if "error" not in result:
            attach_flops(case, result)
            print(f"{case.label:55s} {result['tokens_per_s']:7.1f} tok/s  rss {result['peak_rss_mib']:6.0f} MiB  "
                  f"loss {final_loss(result):.4f}  mfu {result['mfu'] * 100:4.1f}%  ({result['wall_s']:.0f}s)",
                  flush=True)
        else:
            print(f"{case.label:55s} FAILED: {result['error']}", flush=True)
        results[case.label] = {**result, "steps": case.steps}
        if raw is not None:  # after each case, so an interrupted run keeps what it measured
            raw.write_text(json.dumps({"peak": peak, "machine": info, "results": results}, indent=1) + "\n",
                           encoding="utf-8")
    command = "python bench/train_throughput.py " + " ".join(sys.argv[1:])
    shown = [c for c in all_cases(steps, args.quick, args.device) if c.label in results] if args.merge else cases
    report = render(shown, results, peak, info, command.strip(), started, (load_start, os.getloadavg()[0]))
    print()
    print(report)
    if out:
        Path(out).write_text(report + "\n" + kept_notes(Path(out)), encoding="utf-8")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
