"""tunesmith runs list|show."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

runs_app = typer.Typer(help="Training runs: what is there, how it went.", no_args_is_help=True)
console = Console()


def register(app: typer.Typer) -> None:
    """Add ``tunesmith runs`` to the root app."""
    app.add_typer(runs_app, name="runs")


@runs_app.command("list")
def list_command(
    root: Optional[Path] = typer.Option(None, "--dir", help="folder holding runs (default: ./runs and "
                                                             "TUNESMITH_HOME/runs)"),
) -> None:
    """List runs: status, method, base model, data, tokens, final losses, time."""
    from tunesmith.train.runs import list_runs, run_roots

    roots = [root] if root is not None else run_roots()
    runs = [run for folder in roots for run in list_runs(folder)]
    if not runs:
        console.print(f"no runs in {' or '.join(str(r) for r in roots)}; start one with: "
                      "tunesmith train --model smollm2-135m --data train.jsonl", highlight=False)
        return
    table = Table(title="runs")
    table.add_column("name", no_wrap=True)
    for column in ("status", "method", "base", "data", "steps", "tokens", "train loss", "valid loss", "time"):
        table.add_column(column, overflow="fold")
    for run in runs:
        table.add_row(*_summary_row(run))
    console.print(table)


@runs_app.command("show")
def show_command(run: str = typer.Argument(..., help="run folder or name")) -> None:
    """Show one run: settings, resolved hyperparameters, metrics, checkpoints and files."""
    from tunesmith.cli.train import resolved_table
    from tunesmith.train.runs import resolve_run

    found = resolve_run(run, require_finished=False)
    m = found.manifest
    table = Table(title=f"run {found.name}", show_header=False, title_justify="left")
    table.add_column("field", style="cyan")
    table.add_column("value", overflow="fold")
    progress = m.get("progress", {})
    parent = m.get("parent_run")
    rows = [
        ("folder", str(found.path)),
        ("status", found.status + (f" ({m['stop_reason']})" if m.get("stop_reason") else "")),
        ("method", found.method),
        ("base model", f"{m.get('base_model', {}).get('ref')}"),
        ("continued from", parent["name"] if parent else "—"),
        ("training file", f"{m.get('data', {}).get('training_file')} ({m.get('data', {}).get('n_train_examples')} "
                          "examples)"),
        ("validation", f"{m.get('data', {}).get('validation_file') or '—'} "
                       f"({m.get('data', {}).get('n_valid_examples', 0)} examples)"),
        ("chat template", f"{m.get('chat_template_source')} (turn ends with {m.get('end_of_turn')})"),
        ("system prompt", "dropped in training" if m.get("drop_system") else "kept"),
        ("steps", f"{progress.get('step', 0)} of {progress.get('total_steps', '?')}"),
        ("trained tokens", str(m.get("trained_tokens", 0))),
        ("train time", _duration(m.get("timings", {}).get("train_seconds"))),
        ("created", str(m.get("created_at"))),
        ("finished", str(m.get("finished_at") or "—")),
        ("final model", str(found.final_dir) if found.finished else "— (not finished)"),
    ]
    rows += [(key, f"{value:.4f}") for key, value in (m.get("metrics") or {}).items() if value is not None]
    if m.get("error"):
        rows.append(("error", str(m["error"])))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    if m.get("resolved"):
        console.print(resolved_table(m["resolved"]))
    checkpoints = found.checkpoints()
    if checkpoints:
        console.print("checkpoints: " + ", ".join(p.name for p in checkpoints), highlight=False)
    if found.status != "succeeded":
        console.print(f"resume with: tunesmith train --out {found.path} --resume", highlight=False)


def _summary_row(run) -> list[str]:
    m = run.manifest
    metrics = m.get("metrics") or {}
    progress = m.get("progress", {})
    data = Path(m.get("data", {}).get("training_file") or "?").name
    base = str(m.get("base_model", {}).get("name") or m.get("base_model", {}).get("ref") or "?")
    return [run.name, run.status, run.method, base, data,
            f"{progress.get('step', 0)}/{progress.get('total_steps', '?')}", str(m.get("trained_tokens", 0)),
            _loss(metrics.get("train_loss")), _loss(metrics.get("valid_loss")),
            _duration(m.get("timings", {}).get("train_seconds"))]


def _loss(value) -> str:
    return "—" if value is None else f"{value:.4f}"


def _duration(seconds) -> str:
    if seconds is None:
        return "—"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
