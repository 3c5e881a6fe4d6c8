"""The ``tunesmith`` command: a thin typer app.

Each concept has its own module here exposing ``register(app)``; commands parse
flags, call the layers below and render with rich. Errors the user can act on
(:class:`tunesmith.errors.TunesmithError`) are printed without a traceback and
exit non-zero; set ``TUNESMITH_DEBUG=1`` to see tracebacks of unexpected errors.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer
from rich.console import Console

from tunesmith.errors import TunesmithError

app = typer.Typer(
    name="tunesmith",
    help="Fine-tune open LLMs on your own machines: data check → train → chat/serve → eval.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# One module per concept; the order is the order of `tunesmith --help`.
COMMAND_MODULES = ["models", "data", "train", "runs", "chat", "demo", "evaluate", "service", "client"]

err_console = Console(stderr=True)
MAX_PROBLEMS_SHOWN = 50


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"tunesmith.cli.{name}")
        module.register(app)


def report_error(exc: TunesmithError) -> None:
    """Print a user-facing error: the message, each listed problem, and the hint."""
    err_console.print("[bold red]error:[/] ", end="")
    err_console.print(exc.message, highlight=False, markup=False, soft_wrap=True)
    problems = [p for p in getattr(exc, "problems", []) if p not in exc.message]
    for problem in problems[:MAX_PROBLEMS_SHOWN]:
        err_console.print(f"  {problem}", highlight=False, markup=False, soft_wrap=True)
    if len(problems) > MAX_PROBLEMS_SHOWN:
        err_console.print(f"  … and {len(problems) - MAX_PROBLEMS_SHOWN} more", highlight=False)
    if exc.hint:
        err_console.print("[yellow]hint:[/] ", end="")
        err_console.print(exc.hint, highlight=False, markup=False, soft_wrap=True)


def main() -> None:
    """Console entry point."""
    _register_commands()
    try:
        # Without standalone mode click returns typer.Exit codes instead of exiting with them.
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except TunesmithError as exc:
        report_error(exc)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # an unexpected failure: say what, keep the trace for debugging
        if os.environ.get("TUNESMITH_DEBUG"):
            raise
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            err_console.print("aborted")
            sys.exit(1)
        err_console.print("[bold red]error:[/] ", end="")
        err_console.print(f"unexpected {type(exc).__name__}: {exc}", highlight=False, markup=False)
        err_console.print("[yellow]hint:[/] rerun with TUNESMITH_DEBUG=1 for the traceback and report it", highlight=False)
        sys.exit(1)
