"""FFT or PEFT on your data: train each method, evaluate each, and recommend one from the numbers.

Every method trains on the same data with its auto hyperparameters (or the given
epochs), measured for wall time, tokens per second, peak memory, trainable
parameters, artefact size and final validation loss; then all fine-tuned models
and the prompted base answer the same held-out cases in one evaluation.
"""

from __future__ import annotations

import csv
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from tunesmith.errors import ConfigError
from tunesmith.eval.metrics import check_metric
from tunesmith.eval.runner import PROMPTED, TUNED, Contender, evaluate

SAMPLE_EVERY_S = 0.2


@dataclass
class CompareSettings:
    """What ``tunesmith compare`` does; validated before anything trains."""

    data: str
    validation: str
    methods: list[str] = field(default_factory=lambda: ["full", "lora", "dora"])
    model: str = "smollm2-135m"
    metric: str = "auto"
    shots: int = 3
    epochs: int | str = "auto"
    max_length: int | None = None
    drop_system: bool = True
    seed: int = 42
    out: str = "runs/compare"

    def validate(self) -> None:
        """Every problem at once.

        Raises:
            ConfigError: unknown methods, no methods, repeated methods, a bad metric or shot count, missing files.
        """
        from tunesmith.train.methods import METHODS

        problems = []
        if not self.methods:
            problems.append("methods: name at least one (full, lora, dora)")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            problems.append(f"methods: {', '.join(unknown)} unknown; use {', '.join(sorted(METHODS))}")
        if len(set(self.methods)) != len(self.methods):
            problems.append("methods: each method once")
        try:
            check_metric(self.metric)
        except Exception as exc:  # reported with the other problems
            problems.append(f"metric: {exc}")
        if self.shots < 0:
            problems.append(f"shots: must be 0 or more, got {self.shots}")
        for name in ("data", "validation"):
            if not Path(getattr(self, name)).is_file():
                problems.append(f"{name}: file {getattr(self, name)} does not exist")
        if problems:
            raise ConfigError(problems, "fix the settings above and run again")


class PeakMemory:
    """The peak memory while a block runs: the GPU's allocator peak, or this process's resident set."""

    def __init__(self, device: str | None = None):
        import torch

        self.cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        import psutil
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return self
        process = psutil.Process()
        self.peak = process.memory_info().rss

        def sample() -> None:
            while not self._stop.wait(SAMPLE_EVERY_S):
                self.peak = max(self.peak, process.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import psutil
        import torch

        if self.cuda:
            self.peak = int(torch.cuda.max_memory_allocated())
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, psutil.Process().memory_info().rss)


@dataclass
class MethodRun:
    """One method's training, measured."""

    method: str
    run_dir: str
    final_dir: str
    wall_time_s: float
    trained_tokens: int
    tokens_per_second: float
    peak_memory_bytes: int
    trainable_parameters: int
    artefact_bytes: int
    valid_loss: float | None


def train_method(settings: CompareSettings, method: str, on_event=None) -> MethodRun:
    """Train ``method`` on the comparison's data and measure it."""
    from tunesmith.train.config import TrainConfig
    from tunesmith.train.recipe import train

    options = dict(model=settings.model, data=settings.data, validation=settings.validation, method=method,
                   epochs=settings.epochs, drop_system=settings.drop_system, seed=settings.seed,
                   out=str(Path(settings.out) / method))
    if settings.max_length is not None:
        options["max_length"] = settings.max_length
    started = time.perf_counter()
    with PeakMemory() as memory:
        result = train(TrainConfig(**options), on_event=on_event)
    wall = time.perf_counter() - started
    final = Path(result.final_dir)
    return MethodRun(
        method=method, run_dir=str(result.run_dir), final_dir=str(final), wall_time_s=wall,
        trained_tokens=result.trained_tokens, tokens_per_second=result.trained_tokens / wall if wall else 0.0,
        peak_memory_bytes=memory.peak,
        trainable_parameters=int(result.resolved.get("trainable_parameters") or stored_parameters(final)),
        artefact_bytes=folder_bytes(final), valid_loss=_valid_loss(result),
    )


def _valid_loss(result) -> float | None:
    value = (result.metrics or {}).get("valid_loss")
    if value is None:
        curve = loss_curve(Path(result.run_dir))
        value = next((v for _, v in reversed(curve["valid"])), None)
    return float(value) if value is not None else None


def stored_parameters(folder: Path) -> int:
    """How many parameters the safetensors files in ``folder`` hold."""
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                total += _numel(handle.get_slice(key).get_shape())
    return total


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def folder_bytes(folder: Path) -> int:
    """The size on disk of every file under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def loss_curve(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, loss) pairs of a run's metrics.csv for training and validation."""
    train, valid = [], []
    path = Path(run_dir) / "metrics.csv"
    if path.is_file():
        with path.open(encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                step = int(row["step"])
                if row.get("train_loss"):
                    train.append((step, float(row["train_loss"])))
                if row.get("valid_loss"):
                    valid.append((step, float(row["valid_loss"])))
    return {"train": train, "valid": valid}


def recommend(rows: list[dict], quality: str) -> str:
    """One line that follows from the numbers: the best quality, unless a cheaper method is as good.

    Two methods are "as good" when their confidence intervals overlap; then the one with the
    smaller artefact and the shorter training wins.
    """
    best = max(rows, key=lambda r: r["score"])
    tied = [r for r in rows if r["ci_high"] >= best["ci_low"] and best["ci_high"] >= r["ci_low"]]
    cheapest = min(tied, key=lambda r: (r["artefact_bytes"], r["wall_time_s"]))
    if cheapest["method"] == best["method"]:
        others = [r for r in rows if r is not best]
        why = (f"it has the best {quality} ({100 * best['score']:.1f}%)"
               + (f" and the smallest artefact ({best['artefact_bytes'] / 2**20:.1f} MiB)" if len(tied) > 1 else ""))
        if others and len(tied) == 1:
            why += ", clearly above the others (confidence intervals do not overlap)"
        return f"use {best['method']}: {why}."
    size_ratio = best["artefact_bytes"] / max(1, cheapest["artefact_bytes"])
    time_ratio = best["wall_time_s"] / max(1e-9, cheapest["wall_time_s"])
    return (f"use {cheapest['method']}: its {quality} ({100 * cheapest['score']:.1f}%) is within the confidence "
            f"interval of {best['method']} ({100 * best['score']:.1f}%), with a {size_ratio:.0f}× smaller artefact "
            f"and {time_ratio:.1f}× the training speed.")


def compare(settings: CompareSettings, *, progress: Callable[[str, int, int], None] | None = None,
            say: Callable[[str], None] | None = None) -> dict:
    """Train every method, evaluate them with the prompted base, write report.md/.json and charts.

    Returns:
        the report payload (also written to ``settings.out``).
    """
    from tunesmith.eval.report import quality_name, write_report

    settings.validate()
    say = say or (lambda line: None)
    runs: list[MethodRun] = []
    for i, method in enumerate(settings.methods):
        def on_event(event, method=method) -> None:
            if event.kind == "metrics" and progress is not None:
                progress(f"training {method}", int(event.data.get("step", 0)), int(event.data.get("total_steps", 0)))

        if progress is not None:
            progress(f"training {method} ({i + 1}/{len(settings.methods)})", 0, 0)
        run = train_method(settings, method, on_event)
        say(f"{method}: trained in {run.wall_time_s:.0f} s, {run.tokens_per_second:.0f} tokens/s, "
            f"artefact {run.artefact_bytes / 2**20:.1f} MiB")
        runs.append(run)
    contenders = [Contender(r.method, r.final_dir, TUNED) for r in runs]
    base_label = f"{settings.model} + {settings.shots} shots"
    contenders.append(Contender(base_label, settings.model, PROMPTED))
    result = evaluate(contenders, settings.validation, metric=settings.metric, shots=settings.shots,
                      examples_from=settings.data, progress=progress)
    quality = quality_name(result.metric)
    rows = []
    for run in runs:
        summary = result.result(run.method).summary()
        rows.append({**asdict(run), **{k: summary[k] for k in ("score", "ci_low", "ci_high", "prompt_tokens_mean",
                                                                "latency_p50_s", "latency_p95_s")}})
    out = Path(settings.out)
    curves = {run.method: loss_curve(Path(run.run_dir)) for run in runs}
    extra = {"methods": rows, "base": result.result(base_label).summary(), "recommendation": recommend(rows, quality),
             "settings": asdict(settings)}
    payload = write_report(result, out, settings.validation, extra)
    chart = write_loss_chart(curves, out / "loss_curves.png")
    payload["charts"].append(chart.name)
    _append_methods_section(out / "report.md", rows, payload)
    return payload


def write_loss_chart(curves: dict[str, dict], path: Path) -> Path:
    """Training (solid) and validation (dashed) loss of every method on one chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tunesmith.atomic import atomic_file

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (method, curve) in enumerate(curves.items()):
        color = f"C{i}"
        if curve["train"]:
            ax.plot(*zip(*curve["train"]), color=color, alpha=0.6, label=f"{method} train")
        if curve["valid"]:
            ax.plot(*zip(*curve["valid"]), color=color, linestyle="--", marker="o", label=f"{method} valid")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)
    return path


def _append_methods_section(report: Path, rows: list[dict], payload: dict) -> None:
    from tunesmith.atomic import atomic_file

    quality = payload["quality"]
    lines = ["", "## Methods compared", "",
             f"| method | wall time | tokens/s | peak memory | trainable params | artefact | valid loss | {quality} (95% CI) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loss = "—" if r["valid_loss"] is None else f"{r['valid_loss']:.3f}"
        lines.append(f"| {r['method']} | {r['wall_time_s']:.0f} s | {r['tokens_per_second']:.0f} | "
                     f"{r['peak_memory_bytes'] / 2**20:.0f} MiB | {r['trainable_parameters'] / 1e6:.2f}M | "
                     f"{r['artefact_bytes'] / 2**20:.1f} MiB | {loss} | {100 * r['score']:.1f}% "
                     f"({100 * r['ci_low']:.1f}–{100 * r['ci_high']:.1f}) |")
    lines += ["", f"**Recommendation:** {payload['recommendation']}", "", "![loss curves](loss_curves.png)", ""]
    text = report.read_text(encoding="utf-8") + "\n".join(lines)
    with atomic_file(report, "w", encoding="utf-8") as handle:
        handle.write(text)
