"""tunesmith train and tunesmith export."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

console = Console()

# Options the CLI leaves unset (None) fall back to TrainConfig's defaults, or, with --resume,
# to the run's saved settings.
OPTION_FIELDS = {
    "model": "model", "data": "data", "validation": "validation", "method": "method", "epochs": "epochs",
    "batch_size": "batch_size", "learning_rate_multiplier": "learning_rate_multiplier", "lora_r": "lora_r",
    "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout", "max_length": "max_length", "seed": "seed",
    "suffix": "suffix", "save_every": "save_every_steps", "validation_split": "validation_split",
    "eval_every": "eval_every_steps", "replay": "replay", "gradient_accumulation_steps": "gradient_accumulation_steps",
    "warmup_ratio": "warmup_ratio", "schedule": "schedule", "max_grad_norm": "max_grad_norm", "device": "device",
    "precision": "precision",
}


def register(app: typer.Typer) -> None:
    """Add ``tunesmith train`` and ``tunesmith export`` to the root app."""
    app.command("train")(train_command)
    app.command("export")(export_command)


def train_command(
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="base model (name, HF folder, .gguf) or a finished run to continue"),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="training file (JSONL chat, Alpaca, ShareGPT...)"),
    validation: Optional[str] = typer.Option(None, "--validation", help="validation file"),
    method: Optional[str] = typer.Option(None, "--method", help="lora (default), dora or full"),
    epochs: Optional[str] = typer.Option(None, "--epochs", help="N or auto"),
    batch_size: Optional[str] = typer.Option(None, "--batch-size", help="N or auto"),
    learning_rate_multiplier: Optional[str] = typer.Option(None, "--learning-rate-multiplier", help="X or auto"),
    lora_r: Optional[int] = typer.Option(None, "--lora-r", help="LoRA rank (16)"),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", help="LoRA alpha (32)"),
    lora_dropout: Optional[float] = typer.Option(None, "--lora-dropout", help="LoRA dropout (0)"),
    target_modules: Optional[list[str]] = typer.Option(
        None, "--target-modules", help="all-linear (default), or module names (repeat or comma-separate)"),
    rslora: bool = typer.Option(False, "--rslora", help="rank-stabilised LoRA scaling (alpha/sqrt(r))"),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="tokens per example (1024)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="random seed (42); a CPU run is reproducible"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="run folder (default ./runs/<name>)"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run from its last checkpoint"),
    suffix: Optional[str] = typer.Option(None, "--suffix", help="a short name for the run"),
    drop_system: bool = typer.Option(False, "--drop-system", help="train without the system prompt"),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="also checkpoint every N steps"),
    validation_split: Optional[float] = typer.Option(None, "--validation-split",
                                                     help="hold out this fraction for validation"),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="validate every N steps"),
    replay: Optional[str] = typer.Option(None, "--replay", help="continuing a run: earlier examples mixed in "
                                         "per new one, X or auto (1 when the earlier files are there)"),
    gradient_accumulation_steps: Optional[int] = typer.Option(None, "--gradient-accumulation-steps",
                                                              help="batches per optimizer step (1)"),
    warmup_ratio: Optional[float] = typer.Option(None, "--warmup-ratio", help="share of steps warming up (0.05)"),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="cosine (default), linear or constant"),
    max_grad_norm: Optional[float] = typer.Option(None, "--max-grad-norm", help="gradient clipping (1.0)"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N (default: CUDA if present)"),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto (bf16 where the hardware has native "
                                            "bf16 matmul, else fp32), fp32 or bf16"),
) -> None:
    """Fine-tune a model on your data (LoRA by default; --method full trains every weight)."""
    given = {name: value for name, value in locals().items() if name in OPTION_FIELDS and value is not None}
    flags = {"use_rslora": rslora, "drop_system": drop_system}
    config = build_config(given, target_modules, flags, out=out, resume=resume)
    from tunesmith.train.recipe import train

    view = TrainingView(console)
    started = time.perf_counter()
    with view:
        result = train(config, resume=resume, on_event=view.handle)
    show_result(result, time.perf_counter() - started)
    if result.status != "succeeded":
        raise SystemExit(130)  # typer.Exit would be swallowed: the root app runs with standalone_mode=False


def build_config(given: dict[str, Any], target_modules: list[str] | None, flags: dict[str, bool], *,
                 out: str | None, resume: bool):
    """A TrainConfig from the options given (with --resume, on top of the run's saved settings).

    Raises:
        ConfigError: every invalid or missing setting at once.
    """
    from tunesmith.errors import ConfigError
    from tunesmith.train.config import TrainConfig
    from tunesmith.train.runs import read_manifest, resumable_run_dir

    numeric = ("epochs", "batch_size", "learning_rate_multiplier", "replay")
    values = {OPTION_FIELDS[name]: _number_or_text(value) if name in numeric else value
              for name, value in given.items()}
    if "lora_alpha" in values and float(values["lora_alpha"]).is_integer():
        values["lora_alpha"] = int(values["lora_alpha"])
    if target_modules:
        names = [part.strip() for item in target_modules for part in item.split(",") if part.strip()]
        values["target_modules"] = names[0] if names == ["all-linear"] else names
    values.update({key: True for key, on in flags.items() if on})
    if out is not None:
        values["out"] = out
    if resume and out is not None:
        saved = read_manifest(resumable_run_dir(out)).get("config", {})
        return TrainConfig.from_dict({**saved, **values})
    missing = [f"{name}: required (--{name})" for name in ("model", "data") if name not in values]
    if missing:
        raise ConfigError(missing, "pass --model and --data (with --resume, --out of the run is enough)")
    return TrainConfig(**values)


def _number_or_text(value: str):
    """"auto" stays text; numbers become int/float; anything else is left for validation to report."""
    text = value.strip()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


class TrainingView:
    """Renders training events: messages as lines, metrics on a rich progress bar."""

    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"),
            TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False)
        self.task = None

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()
        return False

    def handle(self, event) -> None:
        if event.kind == "metrics":
            self._metrics(event.data)
        elif event.kind == "checkpoint":
            self.progress.console.print(f"[dim]checkpoint step {event.data['step']} → {event.data['path']}[/]")
        elif "resolved" in event.data:
            self.progress.console.print(resolved_table(event.data["resolved"], SHOWN_AT_START))
        elif "reason" in event.data or "final_dir" in event.data:
            return  # the end of the run: show_result says it, with what to do next
        else:
            self.progress.console.print(event.message, highlight=False, markup=False)

    def _metrics(self, data: dict) -> None:
        fields = {"epoch": f"{data['epoch']}/{data['n_epochs']}", "loss": f"{data['train_loss']:.4f}",
                  "speed": f"{data['tokens_per_second']:.0f}"}
        if self.task is None:
            self.task = self.progress.add_task("train", total=data["total_steps"], completed=data["step"] - 1,
                                               **fields)
        self.progress.update(self.task, completed=data["step"], **fields)
        if data.get("valid_loss") is not None:
            self.progress.console.print(f"step {data['step']}: train loss {data['train_loss']:.4f}, "
                                        f"valid loss {data['valid_loss']:.4f}, valid token accuracy "
                                        f"{data['valid_mean_token_accuracy']:.3f}", highlight=False)


# What `train` shows at start; `runs show` and the manifest have every resolved value.
SHOWN_AT_START = ("method", "n_epochs", "batch_size", "gradient_accumulation_steps", "learning_rate_multiplier",
                  "learning_rate", "total_steps", "warmup_steps", "schedule", "lora_r", "lora_alpha",
                  "lora_dropout", "target_modules", "use_rslora", "use_dora", "trainable_parameters",
                  "n_train_examples", "n_replay_examples", "n_valid_examples", "device", "weights_dtype", "precision")


def resolved_table(resolved: dict, keys: tuple[str, ...] | None = None) -> Table:
    """The resolved hyperparameters (``keys`` only, when given) as a two-column table."""
    table = Table(title="resolved hyperparameters", show_header=False, title_justify="left")
    table.add_column("setting", style="cyan")
    table.add_column("value")
    for key, value in resolved.items():
        if keys is None or key in keys:
            table.add_row(key, _show(value))
    return table


def show_result(result, seconds: float) -> None:
    """The end of a run: where the result is, or how to resume."""
    metrics = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in result.metrics.items() if v is not None)
    if result.status == "succeeded":
        console.print(f"[green]done[/] in {seconds:.0f}s: {result.steps} steps, {result.trained_tokens} tokens; "
                      f"{metrics}", highlight=False)
        console.print(f"model: {result.final_dir}\nnext:  tunesmith chat {result.run_dir}", highlight=False)
    else:
        console.print(f"[yellow]stopped[/] ({result.reason}) after step {result.steps}; checkpoint saved.",
                      highlight=False)
        console.print(f"resume: tunesmith train --out {result.run_dir} --resume", highlight=False)


def export_command(
    run: str = typer.Argument(..., help="a finished run (folder or name)"),
    merged: Path = typer.Option(..., "--merged", help="folder to write the merged full model to"),
) -> None:
    """Write a finished run as one standalone model folder (adapter merged into its base)."""
    from tunesmith.models.export import export_merged

    with console.status(f"merging {run}"):
        out = export_merged(run, merged)
    console.print(f"[green]exported[/] {out} (loadable with transformers AutoModelForCausalLM, "
                  f"and as --model)", highlight=False)


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)

