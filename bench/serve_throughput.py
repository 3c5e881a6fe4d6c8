#!/usr/bin/env python
"""Serving throughput, side by side: a real ``tunesmith serve`` against sequential ``model.generate``.

Starts ``tunesmith serve`` in a temporary TUNESMITH_HOME (base models from
TUNESMITH_MODELS_DIR or the default cache), fine-tunes ``--adapters`` LoRA
adapters (r=16, all linear layers) on it with short real jobs through the API
(each an ``ft:...`` model), then measures with the official ``openai`` client,
one thread per concurrent request:

- the base model, one fine-tuned adapter, and ``--adapters`` different adapters at
  once (request i asks adapter i), at 1 and 8 concurrent chat requests of
  ``--tokens`` new tokens each, greedy, sent with ``ignore_eos`` so that every
  request can run to ``max_tokens``; the table counts the real ``completion_tokens``
  from each response's usage (a server that ignores ``ignore_eos`` stops at the end
  of turn, and the table shows it);
- beside it, in this process, plain sequential ``model.generate`` on the same
  prompts (greedy, ``min_new_tokens == max_new_tokens == --tokens``).

It prints a table and writes bench/SERVING.md with the ratios (8 concurrent vs
sequential generate; 8 adapters vs 1 adapter), the machine, versions and the command.

    python bench/serve_throughput.py            # the full run (about 10 minutes on 2 cores)
    python bench/serve_throughput.py --quick    # a smoke run: 16 tokens, 2 adapters
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.service.conftest import Server, wait_finished, write_jsonl  # noqa: E402

MODEL = "smollm2-135m"
# The server's own defaults, not the tests' fast polling (an idle worker polling every 0.3 s costs CPU).
SERVER_DEFAULTS = {"TUNESMITH_HEARTBEAT_S": "2", "TUNESMITH_STALE_AFTER_S": "30", "TUNESMITH_POLL_S": "1",
                   "TUNESMITH_PAUSE_GRACE_S": "120"}
TOPICS = ["the history of bread", "how rivers shape valleys", "the life of honey bees", "why the sky is blue",
          "the first electronic computers", "planting a vegetable garden", "the Apollo moon landings",
          "ocean currents and climate"]


def prompts(count: int) -> list[list[dict]]:
    """Chat requests that ask for long answers (different lengths of prompt too)."""
    return [[{"role": "user", "content": f"Write a long, detailed essay of at least 600 words about "
                                         f"{TOPICS[i % len(TOPICS)]}." + " Be thorough." * (i % 3)}]
            for i in range(count)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# ------------------------------------------------------------------------------------ baseline

def sequential_generate(path: Path, requests: list[list[dict]], tokens: int) -> dict:
    """Plain ``model.generate`` on each prompt in turn (greedy, exactly ``tokens`` new tokens)."""
    import torch

    from tunesmith.data.chat import encode_prompt
    from tunesmith.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, device=torch.device("cpu"), dtype=torch.float32).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [torch.tensor([encode_prompt(tokenizer, messages)]) for messages in requests]
    with torch.inference_mode():  # warm-up, not timed
        model.generate(input_ids=ids[0], attention_mask=torch.ones_like(ids[0]), max_new_tokens=4,
                       do_sample=False, pad_token_id=pad)
    latencies, produced = [], 0
    start = time.perf_counter()
    for prompt in ids:
        began = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                                 min_new_tokens=tokens, do_sample=False, pad_token_id=pad)
        latencies.append(time.perf_counter() - began)
        produced += out.shape[1] - prompt.shape[1]
    wall = time.perf_counter() - start
    del model
    return _row("sequential model.generate (in process)", 1, produced, len(ids), wall, latencies)


# ------------------------------------------------------------------------------------- server

def train_adapters(server: Server, count: int) -> list[str]:
    """``count`` fine-tuned LoRA models (r=16, all linear layers) from short real jobs; their ``ft:`` names."""
    client = server.client()
    names = []
    for i in range(count):
        rows = [{"messages": [{"role": "user", "content": f"Ticket T-{100 * i + j}"},
                              {"role": "assistant", "content": ["billing", "network", "storage", "identity"][
                                  (i + j) % 4]}]} for j in range(12)]
        path = write_jsonl(server.home / f"train-{i}.jsonl", rows)
        uploaded = client.files.create(file=path.open("rb"), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model=MODEL, training_file=uploaded.id, suffix=f"bench{i}", seed=i,
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}},
            extra_body={"tunesmith": {"lora_r": 16, "lora_alpha": 32}})
        job = wait_finished(client, job.id, timeout=900)
        if job.status != "succeeded":
            raise RuntimeError(f"fine-tuning job {job.id} {job.status}: {job.error}")
        names.append(job.fine_tuned_model)
        print(f"  adapter {i + 1}/{count}: {job.fine_tuned_model}", flush=True)
    return names


def ask(client, model: str, messages: list[dict], tokens: int) -> tuple[int, float]:
    """One chat request; its completion tokens (from usage) and latency."""
    began = time.perf_counter()
    answer = client.chat.completions.create(model=model, messages=messages, max_tokens=tokens, temperature=0,
                                            extra_body={"ignore_eos": True})
    return answer.usage.completion_tokens, time.perf_counter() - began


def measure(server: Server, label: str, models: list[str], requests: list[list[dict]], tokens: int,
            concurrency: int) -> dict:
    """Send every request (request i to ``models[i % len(models)]``), ``concurrency`` at a time."""
    results: list = [None] * len(requests)
    clients = [server.client() for _ in range(concurrency)]
    next_index = iter(range(len(requests)))
    lock = threading.Lock()

    def worker(client) -> None:
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            results[i] = ask(client, models[i % len(models)], requests[i], tokens)

    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return _row(label, concurrency, sum(r[0] for r in results), len(requests), wall, [r[1] for r in results])


def _row(label: str, concurrency: int, produced: int, count: int, wall: float, latencies: list[float]) -> dict:
    return {"label": label, "concurrency": concurrency, "requests": count, "tokens": produced,
            "tokens_per_request": produced / count, "wall_s": wall, "tokens_per_s": produced / wall,
            "p50_s": statistics.median(latencies), "p99_s": percentile(latencies, 0.99)}


# ------------------------------------------------------------------------------------- report

def machine() -> dict:
    import peft
    import torch
    import transformers

    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"}


def table(rows: list[dict]) -> str:
    lines = ["| setup | concurrent | requests | completion tokens (per request) | output tokens/s | p50 latency s "
             "| p99 latency s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['concurrency']} | {r['requests']} | {r['tokens']} "
                     f"({r['tokens_per_request']:.0f}) | {r['tokens_per_s']:.1f} | {r['p50_s']:.2f} | "
                     f"{r['p99_s']:.2f} |")
    return "\n".join(lines)


def one_round(server: Server, path: Path, adapters: list[str], requests: list[list[dict]], args) -> dict:
    """Every setup once: sequential ``generate`` in this process, then the server's setups."""
    rows = {}
    print(f"  sequential model.generate, {len(requests)} prompts x {args.tokens} tokens ...", flush=True)
    rows["generate"] = sequential_generate(path, requests, args.tokens)
    for key, label, models, concurrency in (
            ("base-1", "server, base model", [MODEL], 1),
            ("base-8", "server, base model", [MODEL], 8),
            ("adapter-1", "server, one fine-tuned adapter", adapters[:1], 1),
            ("adapter-8", "server, one fine-tuned adapter", adapters[:1], 8),
            ("mixed-8", f"server, {len(adapters)} different adapters at once", adapters, 8)):
        print(f"  {label}, {concurrency} concurrent ...", flush=True)
        rows[key] = measure(server, label, models, requests, args.tokens, concurrency)
    return rows


def report(rows: dict, args, info: dict, command: str) -> str:
    batched = rows["base-8"]["tokens_per_s"] / rows["generate"]["tokens_per_s"]
    mixed = rows["mixed-8"]["tokens_per_s"] / rows["adapter-8"]["tokens_per_s"]
    full = all(r["tokens"] == r["requests"] * args.tokens for r in rows.values())
    counted = (f"every request generated all {args.tokens} tokens" if full else
               "some requests ended before max_tokens (see the per-request counts): compare tokens/s only")
    return f"""# Serving throughput

Written by `bench/serve_throughput.py`{' (quick smoke run: not a result)' if args.quick else ''}.
A real `tunesmith serve` (continuous batching, mixed LoRA adapters as batched matmuls)
against plain sequential `model.generate` on the same prompts, measured in one run.

- 8 concurrent requests vs sequential `generate`: **{batched:.2f}x** output tokens/s (target ≥ 3x)
- {args.adapters} different adapters at once vs one adapter (8 concurrent each): **{mixed:.2f}x**
  output tokens/s, a change of {100 * (mixed - 1):+.1f}% (target: lose < 10%)

{table(list(rows.values()))}

Each setup ran {args.rounds} time(s), interleaved with the others (sequential `generate`, then the
server's setups, per round); the table keeps each setup's best round, so a machine shared with
other work slows every setup alike. Model `{MODEL}` (fp32, CPU), {args.tokens} new tokens per request
(`max_tokens`, greedy, `ignore_eos`; {counted}); adapters: LoRA r=16 on all linear layers from short real
fine-tuning jobs. Completion tokens are the responses' `usage.completion_tokens`; latency is per
request, from the client.

Machine: {info['cpu']}, {info['cores']} cores (torch threads {info['torch_threads']}); Python {info['python']};
{info['versions']}.

Command: `{command}`
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 tokens, 2 adapters")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per request (default 128)")
    parser.add_argument("--adapters", type=int, default=None, help="fine-tuned adapters (default 8)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds, best kept (default 2)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "SERVING.md")
    args = parser.parse_args()
    args.tokens = args.tokens if args.tokens is not None else (16 if args.quick else 128)
    args.adapters = args.adapters if args.adapters is not None else (2 if args.quick else 8)
    args.rounds = args.rounds if args.rounds is not None else (1 if args.quick else 2)
    command = "python bench/serve_throughput.py " + " ".join(sys.argv[1:])

    from tests.conftest import MODELS_CACHE

    os.environ.setdefault("TUNESMITH_MODELS_DIR", str(MODELS_CACHE))
    from tunesmith.models.store import resolve_model

    path = Path(resolve_model(MODEL).path)
    requests = prompts(8)
    rounds: list[dict[str, dict]] = []
    with tempfile.TemporaryDirectory(prefix="tunesmith-serve-bench-") as scratch:
        home = Path(scratch) / "home"
        home.mkdir()
        # Every request reaches the engine at once (the default of 4 generation threads would cap it).
        server = Server(home, path, workers=1, extra_env={"TUNESMITH_EXTRA_MODELS": "",
                                                          "TUNESMITH_INFERENCE_THREADS": "32",
                                                          **SERVER_DEFAULTS}).start()
        try:
            print(f"fine-tuning {args.adapters} adapters through the API ...", flush=True)
            adapters = train_adapters(server, args.adapters)
            warm = server.client()
            for model in [MODEL, *adapters]:  # load the base and attach every adapter before timing
                ask(warm, model, requests[0], 2)
            for number in range(args.rounds):  # interleaved rounds: a load that drifts hits every setup alike
                print(f"round {number + 1}/{args.rounds}", flush=True)
                rounds.append(one_round(server, path, adapters, requests, args))
        finally:
            server.stop()
    rows = {key: max((r[key] for r in rounds), key=lambda row: row["tokens_per_s"]) for key in rounds[0]}
    text = report(rows, args, machine(), command)
    print(text)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
