"""tunesmith eval, tunesmith compare and tunesmith data split."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tunesmith.models.registry import DEFAULT_MODEL

console = Console()


def register(app: typer.Typer) -> None:
    """Add ``eval`` and ``compare`` to the root app and ``split`` to ``tunesmith data``."""
    from tunesmith.cli.data import data_app

    app.command("eval")(eval_command)
    app.command("compare")(compare_command)
    data_app.command("split")(split_command)


def eval_command(
    tuned: Optional[str] = typer.Option(None, "--tuned", "-t", help="the fine-tuned model: a run, its name, "
                                                                    "final/ or a model folder"),
    data: Path = typer.Option(..., "--data", "-d", help="held-out examples (last assistant message = expected answer)"),
    base: Optional[str] = typer.Option(None, "--base", "-b", help="the prompted base model (default: the tuned "
                                                                  "run's base)"),
    shots: int = typer.Option(3, "--shots", "-k", help="worked examples given to prompted models"),
    examples_from: Optional[Path] = typer.Option(None, "--examples-from", help="training file the examples come "
                                                                               "from (default: the run's)"),
    metric: str = typer.Option("auto", "--metric", help="auto, exact, contains, choice or json"),
    baseline: Optional[list[str]] = typer.Option(None, "--baseline", help="more prompted models (repeatable)"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="generation limit (default: longest "
                                                                        "answer + 8)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="report folder (default ./evals/<data>)"),
) -> None:
    """Measure the fine-tuned model against prompting: quality, prompt tokens, latency."""
    from tunesmith.eval.metrics import check_metric
    from tunesmith.eval.plan import plan_eval

    check_metric(metric)
    plan = plan_eval(tuned=tuned, base=base, baselines=baseline or [], shots=shots, examples_from=examples_from)
    out = out if out is not None else Path("evals") / data.stem
    payload = run_with_progress(plan.contenders, data, metric=metric, shots=shots,
                                examples_from=plan.examples_from, max_tokens=max_tokens, out=out)
    show_report(payload)
    console.print(f"report: {out / 'report.md'}  (and report.json, {', '.join(payload['charts'])})")


def run_with_progress(contenders, data: Path, *, metric: str, shots: int, examples_from, max_tokens, out: Path,
                      extra: dict | None = None) -> dict:
    """Evaluate with a progress bar, then write the report; returns its JSON payload."""
    from tunesmith.eval.report import write_report
    from tunesmith.eval.runner import evaluate

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("evaluating", total=None)

        def progress(stage: str, done: int, total: int) -> None:
            bar.update(task, description=stage, completed=done, total=total)

        result = evaluate(contenders, data, metric=metric, shots=shots, examples_from=examples_from,
                          max_tokens=max_tokens, progress=progress)
    for note in result.notes:
        console.print(f"[yellow]{note}[/]", highlight=False)
    return write_report(result, out, str(data), extra)


def show_report(payload: dict) -> None:
    """The terminal table of a report, then the relative differences."""
    from tunesmith.eval.report import how_asked

    quality = payload["quality"]
    console.print(f"metric: {payload['metric']} ({payload['metric_reason']}); {payload['examples']} held-out "
                  f"examples; greedy, ≤{payload['max_tokens']} new tokens")
    table = Table(title="fine-tuned vs prompted")
    for column in ("model", f"{quality} (95% CI)", "prompt tok", "gen tok", "p50", "p95"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for m in payload["models"]:
        table.add_row(m["label"], f"{100 * m['score']:.1f}% ({100 * m['ci_low']:.0f}–{100 * m['ci_high']:.0f})",
                      f"{m['prompt_tokens_mean']:.0f}", f"{m['completion_tokens_mean']:.1f}",
                      f"{1000 * m['latency_p50_s']:.0f} ms", f"{1000 * m['latency_p95_s']:.0f} ms")
    console.print(table)
    extra = [k for k in ("macro_f1", "non_label_rate", "valid_json_rate", "exact_match") if k in payload["models"][0]]
    for m in payload["models"]:
        figures = ", ".join(f"{k.replace('_', ' ')} {m[k]:.2f}" for k in extra)
        console.print(f"  {m['label']}: asked {how_asked(m, payload['shots'])}" + (f"; {figures}" if figures else ""),
                      highlight=False)
    for row in payload["relative"]:
        console.print(f"[bold]{row['tuned']}[/] vs {row['versus']}: [bold]{row['score_points']:+.1f}[/] {quality} "
                      f"points, [bold]{100 * row['prompt_tokens_saved']:.0f}%[/] fewer prompt tokens, "
                      f"[bold]{100 * row['latency_saved']:.0f}%[/] lower latency (p50)", highlight=False)


def compare_command(
    data: Path = typer.Option(..., "--data", "-d", help="training file"),
    validation: Path = typer.Option(..., "--validation", help="held-out file: validation loss and evaluation"),
    methods: str = typer.Option("full,lora,dora", "--methods", help="comma-separated methods to train"),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="base model"),
    metric: str = typer.Option("auto", "--metric", help="auto, exact, contains, choice or json"),
    shots: int = typer.Option(3, "--shots", "-k", help="worked examples for the prompted base"),
    epochs: str = typer.Option("auto", "--epochs", help="N or auto, for every method"),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="tokens per example"),
    drop_system: bool = typer.Option(True, "--drop-system/--keep-system",
                                     help="train without the system prompt (default) or with it"),
    seed: int = typer.Option(42, "--seed", help="random seed"),
    out: Path = typer.Option(Path("runs/compare"), "--out", "-o", help="folder for the runs and the report"),
) -> None:
    """Train each method on the same data and compare cost and quality: FFT or PEFT, on your data?"""
    from tunesmith.eval.compare import CompareSettings, compare
    from tunesmith.eval.metrics import check_metric

    check_metric(metric)
    settings = CompareSettings(data=str(data), validation=str(validation), methods=_methods(methods), model=model,
                               metric=metric, shots=shots, epochs=epochs, max_length=max_length,
                               drop_system=drop_system, seed=seed, out=str(out))
    settings.validate()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("starting", total=None)

        def progress(stage: str, done: int, total: int) -> None:
            bar.update(task, description=stage, completed=done, total=total)

        payload = compare(settings, progress=progress, say=lambda line: console.print(line, highlight=False))
    show_comparison(payload)
    console.print(f"report: {out / 'report.md'}")


def _methods(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def show_comparison(payload: dict) -> None:
    """The terminal table of a method comparison and its recommendation."""
    quality = payload["quality"]
    table = Table(title="methods compared on your data")
    columns = ("method", "wall time", "tokens/s", "peak memory", "trainable params", "artefact", "valid loss",
               f"{quality} (95% CI)", "prompt tok", "latency p50")
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in payload["methods"]:
        table.add_row(row["method"], f"{row['wall_time_s']:.0f} s", f"{row['tokens_per_second']:.0f}",
                      f"{row['peak_memory_bytes'] / 2**20:.0f} MiB", f"{row['trainable_parameters'] / 1e6:.2f}M",
                      f"{row['artefact_bytes'] / 2**20:.1f} MiB",
                      "—" if row["valid_loss"] is None else f"{row['valid_loss']:.3f}",
                      f"{100 * row['score']:.1f}% ({100 * row['ci_low']:.0f}–{100 * row['ci_high']:.0f})",
                      f"{row['prompt_tokens_mean']:.0f}", f"{1000 * row['latency_p50_s']:.0f} ms")
    base = payload["base"]
    table.add_row(base["label"], "—", "—", "—", "—", "—", "—",
                  f"{100 * base['score']:.1f}% ({100 * base['ci_low']:.0f}–{100 * base['ci_high']:.0f})",
                  f"{base['prompt_tokens_mean']:.0f}", f"{1000 * base['latency_p50_s']:.0f} ms")
    console.print(table)
    console.print(f"[bold]recommendation:[/] {payload['recommendation']}", highlight=False)


def split_command(
    file: Path = typer.Argument(..., help="the data file to split (any supported format)"),
    heldout: float = typer.Option(0.2, "--heldout", help="held-out share (0.2) or count (50)"),
    seed: int = typer.Option(42, "--seed", help="shuffle seed: the same seed gives the same split"),
    stratify: Optional[bool] = typer.Option(None, "--stratify/--no-stratify",
                                            help="keep each label's share (default: when answers are labels)"),
    train_out: Optional[Path] = typer.Option(None, "--train-out", help="default: <name>.train.jsonl beside it"),
    heldout_out: Optional[Path] = typer.Option(None, "--heldout-out", help="default: <name>.heldout.jsonl"),
) -> None:
    """Split a dataset into train and held-out files, deterministically (stratified for labels)."""
    from tunesmith.eval.split import split_file

    split, train_path, held_path = split_file(file, heldout, seed=seed, stratify=stratify, train_out=train_out,
                                              heldout_out=heldout_out)
    how = f"stratified over {split.stratified_by} labels" if split.stratified_by else "not stratified"
    console.print(f"[green]split[/] {file}: {len(split.train)} → {train_path}, {len(split.heldout)} → {held_path} "
                  f"({how}, seed {seed})", highlight=False)
