"""tunesmith chat: talk to a base model, a run or a model folder."""

from __future__ import annotations

import sys
from typing import Optional

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)
EXIT_WORDS = {"/exit", "/quit", "/bye"}
RESET_WORD = "/reset"


def register(app: typer.Typer) -> None:
    """Add ``tunesmith chat`` to the root app."""
    app.command("chat")(chat_command)


def chat_command(
    model: str = typer.Argument(..., help="a run (folder or name), its final/ folder, a checkpoint folder, "
                                          "a base-model name or a model folder"),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="answer this once and exit (for scripts); "
                                                                      "stdin is read when it is not a terminal"),
    system: Optional[str] = typer.Option(None, "--system", "-s",
                                         help="system prompt (default: the one the run was trained with, none if "
                                              "training dropped it; '' for none)"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy (default)"),
    top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling mass when temperature > 0"),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="most tokens per answer"),
    seed: Optional[int] = typer.Option(None, "--seed", help="makes sampling reproducible"),
) -> None:
    """Chat with a model, streaming tokens; --prompt (or stdin) answers once and exits."""
    from tunesmith.infer import Engine, GenerationSettings
    from tunesmith.infer.chat_defaults import default_system_prompt

    settings = GenerationSettings(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    once = prompt if prompt is not None else (None if sys.stdin.isatty() else sys.stdin.read())
    engine = Engine()
    with err_console.status(f"loading {model}", spinner="dots") if once is None else _nothing():
        handle = engine.resolve(model)
    if system is None:
        system, why = default_system_prompt(handle.source)
        if once is None and why:
            err_console.print(f"[dim]{why}[/]", highlight=False)
    history = [{"role": "system", "content": system}] if system else []
    if once is not None:
        if not once.strip():
            from tunesmith.errors import TunesmithError

            raise TunesmithError("the prompt is empty", "pass --prompt TEXT or pipe text on stdin", param="prompt")
        answer(engine, handle, history + [{"role": "user", "content": once.strip()}], settings, plain=True)
        return
    interactive(engine, handle, history, settings)


def answer(engine, handle, messages: list[dict], settings, *, plain: bool) -> str:
    """Stream one answer to stdout; returns its text."""
    stream = engine.chat_stream(handle, messages, settings)
    for delta in stream:
        if plain:
            sys.stdout.write(delta)
            sys.stdout.flush()
        else:
            console.print(delta, end="", markup=False, highlight=False, soft_wrap=True)
    if plain:
        sys.stdout.write("\n")
    else:
        console.print()
    done = stream.completion
    if done is not None and not plain:
        note = " (cut at --max-tokens)" if done.finish_reason == "length" else ""
        err_console.print(f"[dim]{done.prompt_tokens} prompt + {done.completion_tokens} generated tokens, "
                          f"{done.latency_s:.2f} s{note}[/]", highlight=False)
    return done.text if done is not None else ""


def interactive(engine, handle, history: list[dict], settings) -> None:
    """The chat loop: each answer streams; /reset forgets the conversation, /exit or Ctrl-D leaves."""
    console.print(f"[bold]{handle.name}[/] — {'/reset'} starts over, /exit or Ctrl-D leaves", highlight=False)
    start = list(history)
    messages = list(history)
    while True:
        try:
            text = console.input("[bold cyan]you>[/] ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        text = text.strip()
        if not text:
            continue
        if text in EXIT_WORDS:
            return
        if text == RESET_WORD:
            messages = list(start)
            console.print("[dim]conversation cleared[/]")
            continue
        messages.append({"role": "user", "content": text})
        console.print("[bold green]model>[/] ", end="")
        try:
            reply = answer(engine, handle, messages, settings, plain=False)
        except KeyboardInterrupt:
            console.print("\n[dim]stopped[/]")
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
