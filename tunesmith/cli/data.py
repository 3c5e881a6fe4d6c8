"""tunesmith data check|convert (``data split`` is registered by the evaluation module)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from tunesmith.models.registry import DEFAULT_MODEL

data_app = typer.Typer(help="Training data: check a file (errors, warnings, token statistics), convert or split it.",
                       no_args_is_help=True)
console = Console()
MAX_ERRORS_SHOWN = 50


def register(app: typer.Typer) -> None:
    """Add ``tunesmith data`` to the root app."""
    app.add_typer(data_app, name="data")


@data_app.command("check")
def check(
    file: Path = typer.Argument(..., help="training data: JSONL, JSON array or CSV (OpenAI chat, prompt/completion, "
                                          "Alpaca or ShareGPT)"),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="model whose tokenizer and chat template count "
                                                                   "the tokens"),
    max_length: int = typer.Option(None, "--max-length", help="per-example token limit training will use "
                                                              "(default: the model's context)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON for scripts"),
) -> None:
    """Validate a training file: every problem with its line, warnings, tokens, epochs and a time estimate.

    Exits 1 when the file has errors.
    """
    from tunesmith.data.check import check_file

    if as_json:
        report = check_file(file, model=model, max_length=max_length)
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        report = _check_with_progress(file, model, max_length)
        print_report(report)
    if not report.ok:
        raise SystemExit(1)  # the root app runs click with standalone_mode=False, which drops typer.Exit codes


def _check_with_progress(file: Path, model: str, max_length: int | None):
    """check_file with a live count of examples on a terminal (plain otherwise, for logs and pipes)."""
    from tunesmith.data.check import check_file

    if not console.is_terminal:
        return check_file(file, model=model, max_length=max_length)
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(f"checking {file}", total=None)
        return check_file(file, model=model, max_length=max_length,
                          progress=lambda n: bar.update(task, description=f"checking {file}: {n:,} examples"))


def print_report(report) -> None:
    """Render a :class:`tunesmith.data.DataReport` for people."""
    fmt = report.format or "unknown format"
    console.print(f"[bold]{report.file}[/]: {report.examples:,} examples, {fmt}; "
                  f"model {report.model} (chat template: {report.template})", highlight=False, soft_wrap=True)
    if report.stats:
        console.print(_stats_table(report.stats))
    for warning in report.warnings:
        console.print("[yellow]warning:[/] ", end="")
        console.print(warning, highlight=False, markup=False, soft_wrap=True)
    for error in report.errors[:MAX_ERRORS_SHOWN]:
        console.print("[red]error:[/] ", end="")
        console.print(error, highlight=False, markup=False, soft_wrap=True)
    hidden = report.error_count - min(len(report.errors), MAX_ERRORS_SHOWN)
    if hidden > 0:
        console.print(f"[red]error:[/] … and {hidden:,} more (--json lists up to {len(report.errors):,})",
                      highlight=False)
    if report.ok:
        console.print(f"[green]ok[/]: ready to train ({len(report.warnings)} warning"
                      f"{'s' if len(report.warnings) != 1 else ''})")
    else:
        console.print(f"[bold red]{report.error_count:,} error{'s' if report.error_count != 1 else ''}[/]: "
                      "fix them and check again", highlight=False)


def _stats_table(stats) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("valid examples", f"{stats.examples:,}")
    table.add_row("tokens per example", f"min {stats.tokens_min:,} · median {stats.tokens_median:,} · "
                                        f"p95 {stats.tokens_p95:,} · max {stats.tokens_max:,}")
    table.add_row("tokens per epoch", f"{stats.total_tokens:,} (limit {stats.max_length:,} per example)")
    table.add_row("trainable tokens", f"{stats.trainable_tokens:,} (assistant, weight 1)")
    table.add_row("epochs (auto)", str(stats.epochs))
    table.add_row("billed tokens", f"{stats.billed_tokens:,} ({stats.epochs} epoch{'' if stats.epochs == 1 else 's'})")
    if stats.estimated_seconds:
        estimate = " · ".join(f"{method} {_duration(seconds)}" for method, seconds in stats.estimated_seconds.items())
        table.add_row("estimated training time", f"{estimate} ({stats.estimate_device})")
    return table


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 5400:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"


@data_app.command("convert")
def convert(
    file: Path = typer.Argument(..., help="training data in any supported format"),
    out: Path = typer.Option(..., "--out", "-o", help="the OpenAI chat JSONL file to write"),
) -> None:
    """Write a file's examples as normalised OpenAI chat JSONL (refused if the file has errors)."""
    from tunesmith.data.convert import convert_file

    count, fmt = convert_file(file, out)
    console.print(f"[green]wrote[/] {count:,} examples ({fmt} → OpenAI chat) to {out}", highlight=False)
