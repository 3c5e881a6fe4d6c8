"""tunesmith demo: check data → LoRA fine-tune → fine-tuned vs few-shot, measured now."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.panel import Panel

console = Console()


def register(app: typer.Typer) -> None:
    """Add ``tunesmith demo`` to the root app."""
    app.command("demo")(demo_command)


def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="run folder of the demo (its report goes "
                                                                    "in eval/ inside it)"),
    fresh: bool = typer.Option(False, "--fresh", help="train again even if a finished demo run is there"),
    examples: int = typer.Option(0, "--examples", help="evaluate only the first N held-out examples (0 = all)"),
) -> None:
    """End to end on a bundled task the base model cannot do from a prompt; prints the measured gain."""
    from tunesmith.eval import demo
    from tunesmith.eval.runner import PROMPTED, TUNED, Contender

    started = time.perf_counter()
    data = demo.demo_data()
    console.print(Panel.fit(
        "Task: route a support ticket to its team's code in an invented code book (ZX-17 = billing, QM-04 = "
        "sign-in, ... 8 codes).\nThe base model gets the code book and 3 worked examples in every request; "
        f"the fine-tuned model gets only the ticket.\nTraining: {data.train.name} ({_count(data.train)} examples), "
        f"held-out: {data.heldout.name} ({_count(data.heldout)} examples).", title="tunesmith demo",
        border_style="cyan"))

    console.rule("1. check the training data")
    _check(data.train)

    console.rule(f"2. LoRA fine-tune {demo.MODEL} (without the system prompt)")
    run_dir = _train(demo, data, out, fresh)

    console.rule(f"3. answer the held-out tickets: fine-tuned (bare ticket) vs base ({demo.SHOTS} shots + code book)")
    heldout = data.heldout if examples <= 0 else _first(data.heldout, examples, run_dir / "eval")
    contenders = [Contender("fine-tuned (bare ticket)", str(run_dir), TUNED),
                  Contender(f"{demo.MODEL} + {demo.SHOTS} shots", demo.MODEL, PROMPTED)]
    from tunesmith.cli.evaluate import run_with_progress, show_report

    payload = run_with_progress(contenders, heldout, metric="choice", shots=demo.SHOTS, examples_from=data.train,
                                max_tokens=None, out=run_dir / "eval")
    console.rule("4. result (measured just now, on this machine)")
    show_report(payload)
    _verdict(payload)
    console.print(f"report: {run_dir / 'eval' / 'report.md'} · talk to the model: tunesmith chat {run_dir} · "
                  f"demo took {time.perf_counter() - started:.0f} s", highlight=False)


def _check(train_file: Path) -> None:
    from tunesmith.cli.data import print_report
    from tunesmith.data.check import check_file
    from tunesmith.errors import DataError

    report = check_file(train_file, model="smollm2-135m")
    print_report(report)
    if not report.ok:
        raise DataError(f"the bundled demo data {train_file} has errors", report.errors,
                        "reinstall tunesmith, or regenerate it: python -m tunesmith.eval.demo")


def _train(demo, data, out: Path, fresh: bool) -> Path:
    from tunesmith.cli.train import TrainingView
    from tunesmith.train.config import TrainConfig
    from tunesmith.train.recipe import train
    from tunesmith.train.runs import is_run_dir

    run = None if fresh else demo.reusable_run(out, data.train)
    if run is not None:
        console.print(f"reusing the finished demo run {run.path} (--fresh trains again)", highlight=False)
        return Path(run.path)
    if out.exists() and fresh:
        if not is_run_dir(out):
            from tunesmith.errors import TunesmithError

            raise TunesmithError(f"{out} exists and is not a tunesmith run, so --fresh will not delete it",
                                 "choose another --out")
        shutil.rmtree(out)
    elif out.exists():
        if is_run_dir(out):
            shutil.rmtree(out)  # an unfinished or outdated demo run: nothing in it can be reused
        else:
            from tunesmith.errors import TunesmithError

            raise TunesmithError(f"{out} exists and is not a tunesmith run", "choose another --out")
    config = TrainConfig(model=demo.MODEL, data=str(data.train), method="lora", drop_system=True, out=str(out),
                         **demo.HYPERPARAMETERS)
    view = TrainingView(console)
    started = time.perf_counter()
    with view:
        result = train(config, on_event=view.handle)
    if result.status != "succeeded":
        from tunesmith.errors import TunesmithError

        raise TunesmithError(f"training stopped ({result.reason or result.status})",
                             f"run the demo again; or resume: tunesmith train --out {out} --resume")
    console.print(f"trained {result.trained_tokens:,} tokens in {time.perf_counter() - started:.0f} s",
                  highlight=False)
    return Path(result.run_dir)


def _count(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def _first(heldout: Path, count: int, folder: Path) -> Path:
    from tunesmith.atomic import atomic_file

    lines = heldout.read_text(encoding="utf-8").splitlines(keepends=True)[:count]
    target = folder / f"heldout-first-{count}.jsonl"
    with atomic_file(target, "w", encoding="utf-8") as handle:
        handle.write("".join(lines))
    return target


def _verdict(payload: dict) -> None:
    row = payload["relative"][0] if payload["relative"] else None
    if row is None:
        return
    console.print(Panel.fit(
        f"fine-tuning: [bold]{row['score_points']:+.0f}[/] accuracy points, "
        f"[bold]{100 * row['prompt_tokens_saved']:.0f}%[/] fewer prompt tokens, "
        f"[bold]{100 * row['latency_saved']:.0f}%[/] lower latency per request than prompting the same base "
        "model", border_style="green" if row["score_points"] > 0 else "red"))
