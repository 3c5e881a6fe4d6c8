"""Data-layer throughput: `check_file` and encoding speed, and memory that stays flat as files grow.

Generates seeded chat JSONL files of 50,000 and 200,000 short examples in a temporary
folder, then runs each measurement in a fresh Python process so its peak RSS is its own:

* ``check``  — ``tunesmith.data.check_file`` (read, validate, render, tokenize, statistics);
* ``encode`` — ``load_examples`` + ``encode_examples`` (what training does before packing).

Prints examples/s (wall clock and per CPU-second, which is steadier on a busy
machine), peak RSS and the RSS of the same process just before the pass
(tokenizer loaded), so the growth attributable to the file is visible. No assertions:
the figures depend on the machine.

``--against REV`` measures the ``tunesmith`` package of git revision REV on the same
files, alternating with the working tree ``--repeat`` times, and prints the ratios of
the medians (working tree / REV): on a shared machine only side-by-side ratios count.

    python bench/data_throughput.py [--sizes 50000 200000] [--model smollm2-135m]
    python bench/data_throughput.py --sizes 200000 --tasks check --against HEAD~3 --repeat 3
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "number group problem fact be have do say get make go know take see come think look want give use find "
         "tell ask seem feel try leave call good new first last long great little own other old right big high "
         "small large next early young important few public bad same able").split()


def _sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def generate(path: Path, n: int, seed: int = 0) -> None:
    """Write ``n`` short OpenAI chat examples (one in five has two turns), streamed to disk."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            messages = [{"role": "system", "content": "You answer in one sentence."},
                        {"role": "user", "content": f"#{i} " + _sentence(rng, 6, 20)},
                        {"role": "assistant", "content": _sentence(rng, 5, 25)}]
            if i % 5 == 0:
                messages += [{"role": "user", "content": _sentence(rng, 3, 10)},
                             {"role": "assistant", "content": _sentence(rng, 3, 15)}]
            handle.write(json.dumps({"messages": messages}) + "\n")


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _cpu_s() -> float:
    """CPU seconds of this process, all threads (the Rust tokenizer runs several)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def child(task: str, path: str, model: str) -> dict:
    """One measurement in this (fresh) process."""
    import tunesmith
    from tunesmith.data import check_file, encode_examples, load_examples
    from tunesmith.models.loading import load_tokenizer
    from tunesmith.models.store import resolve_model

    tokenizer = load_tokenizer(resolve_model(model).path)
    check_file(Path(path).with_name("warmup.jsonl"), model=model)  # imports, template check, FLOP/s probe
    before = _rss_mb()
    cpu = _cpu_s()
    start = time.perf_counter()
    if task == "check":
        report = check_file(path, model=model)
        n, tokens = report.stats.examples, report.stats.total_tokens
    else:
        n = tokens = 0
        for encoded in encode_examples(tokenizer, load_examples(path)):
            n += 1
            tokens += len(encoded.input_ids)
    seconds = time.perf_counter() - start
    cpu = _cpu_s() - cpu
    return {"task": task, "examples": n, "tokens": tokens, "seconds": round(seconds, 2), "cpu_s": round(cpu, 2),
            "examples_per_s": round(n / seconds), "examples_per_cpu_s": round(n / cpu),
            "rss_before_mb": round(before), "peak_rss_mb": round(_peak_mb()),
            "package": str(Path(tunesmith.__file__).parent)}


def extract_package(rev: str, into: Path) -> Path:
    """The ``tunesmith`` package of git revision ``rev``, written under ``into`` (a PYTHONPATH entry)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "tunesmith"], capture_output=True,
                             check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def measure(task: str, path: Path, model: str, package_root: Path | None) -> dict:
    """Run one measurement in a fresh process, with the package under ``package_root`` (None: this tree)."""
    env = dict(os.environ)
    if package_root is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package_root), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, __file__, "--model", model, "--child", task, str(path)],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(code: str, r: dict) -> str:
    return (f"{code:<8} {r['task']:<7} {r['examples']:>9,} {r['tokens']:>11,} {r['seconds']:>8.1f} "
            f"{r['examples_per_s']:>11,} {r['cpu_s']:>7.1f} {r['examples_per_cpu_s']:>9,} "
            f"{r['rss_before_mb']:>8,} MB {r['peak_rss_mb']:>6,} MB")


def ratios(now: list[dict], then: list[dict]) -> str:
    """Working tree over baseline: medians of examples/s and of examples per CPU-second."""
    def median(rows, key):
        return statistics.median(r[key] for r in rows)

    return (f"{'ratio':<8} {now[0]['task']:<7} {now[0]['examples']:>9,}  examples/s "
            f"{median(now, 'examples_per_s') / median(then, 'examples_per_s'):.2f}x, per CPU-second "
            f"{median(now, 'examples_per_cpu_s') / median(then, 'examples_per_cpu_s'):.2f}x "
            f"(medians of {len(now)} alternating runs each)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", nargs="+", default=["check", "encode"], choices=["check", "encode"])
    parser.add_argument("--against", metavar="REV", help="also measure the package of this git revision")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each measurement (alternating with --against)")
    parser.add_argument("--child", nargs=2, metavar=("TASK", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.model)))
        return
    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-") as tmp:
        tmp = Path(tmp)
        baseline = extract_package(args.against, tmp / "baseline") if args.against else None
        generate(tmp / "warmup.jsonl", 20)
        print(f"{'code':<8} {'task':<7} {'examples':>9} {'tokens':>11} {'seconds':>8} {'examples/s':>11} {'CPU s':>7} "
              f"{'ex/CPU s':>9} {'RSS before':>11} {'peak RSS':>9}")
        for size in args.sizes:
            path = tmp / f"chat-{size}.jsonl"
            generate(path, size)
            for task in args.tasks:
                now, then = [], []
                for _ in range(args.repeat):
                    if baseline is not None:
                        then.append(measure(task, path, args.model, baseline))
                        print(row(args.against[:8], then[-1]), flush=True)
                    now.append(measure(task, path, args.model, None))
                    print(row("tree", now[-1]), flush=True)
                if baseline is not None:
                    print(ratios(now, then), flush=True)


if __name__ == "__main__":
    main()
