"""tunesmith files and jobs: talk to a running tunesmith (or any OpenAI-compatible) server.

They use the official openai client, configured by OPENAI_BASE_URL and OPENAI_API_KEY
or by --base-url and --api-key.
"""

from __future__ import annotations

import contextlib
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from tunesmith.errors import TunesmithError

console = Console()
files_app = typer.Typer(help="Files on a tunesmith server: upload, list, delete.", no_args_is_help=True)
jobs_app = typer.Typer(help="Fine-tuning jobs on a tunesmith server: create, list, follow, cancel.",
                       no_args_is_help=True)

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
FINISHED = ("succeeded", "failed", "cancelled")
BaseUrl = typer.Option(None, "--base-url", help="server URL (default: $OPENAI_BASE_URL, else " + DEFAULT_BASE_URL + ")")
ApiKey = typer.Option(None, "--api-key", help="API key (default: $OPENAI_API_KEY)")


def register(app: typer.Typer) -> None:
    """Add ``tunesmith files`` and ``tunesmith jobs`` to the root app."""
    app.add_typer(files_app, name="files")
    app.add_typer(jobs_app, name="jobs")


def make_client(base_url: str | None, api_key: str | None):
    """An openai client for the server; the flags win over OPENAI_BASE_URL / OPENAI_API_KEY."""
    from openai import OpenAI

    url = base_url if base_url is not None else os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
    key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
    if not key:
        raise TunesmithError("no API key", "pass --api-key or set OPENAI_API_KEY "
                             "(make one on the server with `tunesmith keys create --project NAME`)")
    return OpenAI(base_url=url, api_key=key, max_retries=0)


@contextlib.contextmanager
def server_errors(base_url: str | None = None) -> Iterator[None]:
    """Turn the client's exceptions into errors the CLI prints without a traceback."""
    import openai

    try:
        yield
    except openai.APIConnectionError as exc:
        url = base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        raise TunesmithError(f"cannot reach the server at {url} ({exc.__cause__ or exc})",
                             "start it with `tunesmith serve`, or pass --base-url") from None
    except openai.APIStatusError as exc:
        body = exc.body if isinstance(exc.body, dict) else {}
        message = body.get("message") if "message" in body else (body.get("error") or {}).get("message")
        raise TunesmithError(f"the server answered {exc.status_code}: {message or exc.message}",
                             param=body.get("param")) from None


def _when(stamp: int | None) -> str:
    return datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M:%S") if stamp else "-"


# ------------------------------------------------------------------------------------------ files

def upload(client, path: Path, purpose: str = "fine-tune"):
    """Upload ``path``; returns the file object."""
    if not path.is_file():
        raise TunesmithError(f"{path} is not a file", "check the path")
    with path.open("rb") as handle:
        return client.files.create(file=(path.name, handle), purpose=purpose)


@files_app.command("upload")
def files_upload(file: Path = typer.Argument(..., help="the file to upload"),
                 purpose: str = typer.Option("fine-tune", "--purpose", help="fine-tune (checked on upload), ..."),
                 base_url: Optional[str] = BaseUrl, api_key: Optional[str] = ApiKey) -> None:
    """Upload a file; prints its id (file-…)."""
    client = make_client(base_url, api_key)
    with server_errors(base_url):
        uploaded = upload(client, file, purpose)
    typer.echo(uploaded.id)
    Console(stderr=True).print(f"{uploaded.filename}: {uploaded.bytes} bytes, purpose {uploaded.purpose}",
                               highlight=False)


@files_app.command("list")
def files_list(base_url: Optional[str] = BaseUrl, api_key: Optional[str] = ApiKey) -> None:
    """List this project's files, newest first."""
    client = make_client(base_url, api_key)
    table = Table(title="files")
    for column in ("id", "filename", "purpose", "bytes", "created"):
        table.add_column(column, no_wrap=column == "id", overflow="fold")
    with server_errors(base_url):
        for item in client.files.list():
            table.add_row(item.id, item.filename, item.purpose, str(item.bytes), _when(item.created_at))
    console.print(table)


@files_app.command("delete")
def files_delete(file_id: str = typer.Argument(..., help="file-…"),
                 base_url: Optional[str] = BaseUrl, api_key: Optional[str] = ApiKey) -> None:
    """Delete a file."""
    client = make_client(base_url, api_key)
    with server_errors(base_url):
        client.files.delete(file_id)
    console.print(f"deleted {file_id}", highlight=False)


# ------------------------------------------------------------------------------------------ jobs

def _number_or_auto(value: str | None, name: str, integer: bool):
    if value is None or value == "auto":
        return "auto"
    try:
        return int(value) if integer else float(value)
    except ValueError:
        raise TunesmithError(f"--{name} must be a number or auto, not {value!r}", param=name) from None


def _file_id(client, value: str) -> str:
    """A file id as given, or the id of ``value`` uploaded now when it names a local file."""
    path = Path(value).expanduser()
    if not value.startswith("file-") and path.is_file():
        uploaded = upload(client, path)
        Console(stderr=True).print(f"uploaded {path} as {uploaded.id}", highlight=False)
        return uploaded.id
    return value


@jobs_app.command("create")
def jobs_create(
    model: str = typer.Option(..., "--model", "-m", help="base model or ft:… model on the server"),
    training_file: str = typer.Option(..., "--training-file", "-t", help="file-… id, or a local file to upload"),
    validation_file: Optional[str] = typer.Option(None, "--validation-file", help="file-… id or local file"),
    suffix: Optional[str] = typer.Option(None, "--suffix", help="part of the fine-tuned model's name"),
    epochs: Optional[str] = typer.Option(None, "--epochs", help="N or auto"),
    batch_size: Optional[str] = typer.Option(None, "--batch-size", help="N or auto"),
    learning_rate_multiplier: Optional[str] = typer.Option(None, "--learning-rate-multiplier", help="X or auto"),
    method: Optional[str] = typer.Option(None, "--method", help="tunesmith: lora (default), dora or full"),
    lora_r: Optional[int] = typer.Option(None, "--lora-r", help="tunesmith: LoRA rank"),
    seed: Optional[int] = typer.Option(None, "--seed", help="random seed"),
    follow: bool = typer.Option(False, "--follow", "-f", help="then follow the job until it ends"),
    base_url: Optional[str] = BaseUrl, api_key: Optional[str] = ApiKey,
) -> None:
    """Create a fine-tuning job; prints its id (ftjob-…)."""
    client = make_client(base_url, api_key)
    extras = {k: v for k, v in {"method": method, "lora_r": lora_r}.items() if v is not None}
    hyper = {"n_epochs": _number_or_auto(epochs, "epochs", True),
             "batch_size": _number_or_auto(batch_size, "batch-size", True),
             "learning_rate_multiplier": _number_or_auto(learning_rate_multiplier, "learning-rate-multiplier", False)}
    with server_errors(base_url):
        job = client.fine_tuning.jobs.create(
            model=model, training_file=_file_id(client, training_file),
            validation_file=_file_id(client, validation_file) if validation_file else None,
            suffix=suffix, seed=seed,
            method={"type": "supervised", "supervised": {"hyperparameters": hyper}},
            extra_body={"tunesmith": extras} if extras else None)
    typer.echo(job.id)
    if follow:
        follow_job(client, job.id, base_url)


@jobs_app.command("list")
def jobs_list(limit: int = typer.Option(20, "--limit", help="how many (newest first)"),
              base_url: Optional[str] = BaseUrl, api_key: Optional[str] = ApiKey) -> None:
    """List this project's jobs, newest first."""
    client = make_client(base_url, api_key)
    table = Table(title="fine-tuning jobs")
    for column in ("id", "model", "status", "fine-tuned model", "tokens", "created"):
        table.add_column(column, no_wrap=column == "id", overflow="fold")
    with server_errors(base_url):
        page = client.fine_tuning.jobs.list(limit=limit)
        for job in page.data:
            table.add_row(job.id, job.model, job.status, job.fine_tuned_model or "",
                          str(job.trained_tokens or ""), _when(job.created_at))
    console.print(table)


@jobs_app.command("cancel")
def jobs_cancel(job_id: str = typer.Argument(..., help="ftjob-…"),
                base_url: Optional[str] = BaseUrl, api_key: Optional[str] = ApiKey) -> None:
    """Cancel a job that has not finished."""
    client = make_client(base_url, api_key)
    with server_errors(base_url):
        job = client.fine_tuning.jobs.cancel(job_id)
    console.print(f"{job.id}: {job.status}", highlight=False)


@jobs_app.command("follow")
def jobs_follow(job_id: str = typer.Argument(..., help="ftjob-…"),
                interval: float = typer.Option(1.0, "--interval", help="seconds between polls"),
                base_url: Optional[str] = BaseUrl, api_key: Optional[str] = ApiKey) -> None:
    """Follow a job: its messages, a live progress bar with the loss, until it ends."""
    follow_job(make_client(base_url, api_key), job_id, base_url, interval)


def _new_events(client, job_id: str, seen: set[str]) -> list:
    """Events not shown yet, oldest first (the API lists newest first)."""
    fresh = []
    for event in client.fine_tuning.jobs.list_events(job_id, limit=100).data:
        if event.id in seen:
            break
        fresh.append(event)
    seen.update(e.id for e in fresh)
    return list(reversed(fresh))


def follow_job(client, job_id: str, base_url: str | None = None, interval: float = 1.0) -> None:
    """Poll the job and its events, drawing progress, until it succeeds, fails or is cancelled.

    Raises:
        TunesmithError: the job failed (its error message) or was cancelled.
    """
    seen: set[str] = set()
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn())
    with server_errors(base_url), Progress(*columns, console=console) as bar:
        task = bar.add_task(job_id, total=None, loss="-")
        while True:
            for event in _new_events(client, job_id, seen):
                data = event.data if isinstance(event.data, dict) else {}
                if event.type == "metrics" and data.get("step") is not None:
                    loss = data.get("train_loss")
                    bar.update(task, completed=data["step"], total=data.get("total_steps"),
                               loss=f"{loss:.4f}" if isinstance(loss, (int, float)) else "-")
                else:
                    style = {"error": "red", "warn": "yellow"}.get(event.level, "")
                    bar.console.print(f"[{style}]{event.message}[/]" if style else event.message, highlight=False,
                                      markup=bool(style))
            job = client.fine_tuning.jobs.retrieve(job_id)
            bar.update(task, description=f"{job_id} {job.status}")
            if job.status in FINISHED:
                break
            time.sleep(interval)
    if job.status == "succeeded":
        console.print(f"[green]succeeded[/]: {job.fine_tuned_model} ({job.trained_tokens} tokens trained)",
                      highlight=False)
        return
    if job.status == "failed":
        raise TunesmithError(f"job {job_id} failed: {job.error.message if job.error else 'no reason given'}")
    raise TunesmithError(f"job {job_id} was cancelled")
