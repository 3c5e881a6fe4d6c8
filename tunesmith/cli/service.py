"""tunesmith serve, worker and keys."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()
keys_app = typer.Typer(help="API keys: each opens one project (its files, jobs and models).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add ``tunesmith serve``, ``tunesmith worker`` and ``tunesmith keys`` to the root app."""
    app.command("serve")(serve_command)
    app.command("worker")(worker_command)
    app.add_typer(keys_app, name="keys")


def serve_command(
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (0.0.0.0 for every interface)"),
    port: int = typer.Option(8000, "--port", help="TCP port"),
    workers: int = typer.Option(1, "--workers", min=0, help="training workers to run beside the API (0: API only)"),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error"),
) -> None:
    """Run the OpenAI-compatible API and training workers (state in TUNESMITH_HOME or TUNESMITH_DATABASE_URL)."""
    from tunesmith.service.context import ServiceContext
    from tunesmith.service.projects import list_keys
    from tunesmith.service.server import check_port, serve

    ctx = ServiceContext.from_env()  # validates every setting before anything starts
    check_port(host, port)
    if ctx.settings.api_key is None and not any(k.revoked_at is None for k in list_keys(ctx.engine)):
        console.print("[yellow]no API key yet:[/] set TUNESMITH_API_KEY, or make one with "
                      "`tunesmith keys create --project NAME`", highlight=False)
    console.print(f"tunesmith API on http://{host}:{port}/v1 with {workers} worker(s); "
                  f"state in {ctx.settings.home}", highlight=False)
    serve(host, port, workers, log_level)


def worker_command() -> None:
    """Run one training worker (more workers, or workers on other machines sharing the database)."""
    import logging

    from tunesmith.service.worker import run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run_worker()


def _engine():
    from tunesmith.service.context import ServiceContext

    return ServiceContext.from_env().engine


def _when(stamp: int | None) -> str:
    return datetime.fromtimestamp(stamp, tz=timezone.utc).strftime("%Y-%m-%d") if stamp else "-"


@keys_app.command("create")
def keys_create(
    project: str = typer.Option(..., "--project", "-p", help="project name (created if new)"),
    name: Optional[str] = typer.Option(None, "--name", help="a label to recognise the key by"),
) -> None:
    """Make a new secret key for a project; it is printed once (only its hash is stored)."""
    from tunesmith.service.projects import create_key

    secret, info = create_key(_engine(), project, name)
    typer.echo(secret)
    Console(stderr=True).print(f"key {info.id} for project {info.project!r}: store it now, it is not shown again",
                               highlight=False)


@keys_app.command("list")
def keys_list(project: Optional[str] = typer.Option(None, "--project", "-p", help="only this project")) -> None:
    """Show the keys (redacted): id, project, name, created, revoked."""
    from tunesmith.service.projects import list_keys

    table = Table(title="API keys")
    for column in ("id", "project", "name", "key", "created", "revoked"):
        table.add_column(column, no_wrap=column in ("id", "key"), overflow="fold")
    for key in list_keys(_engine(), project):
        table.add_row(key.id, key.project, key.name or "", key.redacted, _when(key.created_at),
                      _when(key.revoked_at) if key.revoked_at else "")
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="the key's id (key-…), from `tunesmith keys list`")) -> None:
    """Revoke a key; requests with it get 401 from now on."""
    from tunesmith.service.projects import revoke_key

    info = revoke_key(_engine(), key_id)
    console.print(f"revoked {info.id} ({info.project}, {info.redacted})", highlight=False)
