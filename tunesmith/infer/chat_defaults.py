"""The system prompt a model expects by default: the one it was trained with, or none.

A run trained with its system prompt answers best when asked with it again; a run
that dropped it (``--drop-system``) learned to answer the bare input.
"""

from __future__ import annotations

from pathlib import Path

from tunesmith.infer.resolve import ModelSource

MAX_EXAMPLES_READ = 200


def default_system_prompt(source: ModelSource) -> tuple[str | None, str | None]:
    """(system prompt, a line saying where it came from) for chatting with ``source``.

    Returns (None, reason) for a run trained without its system prompt, and (None, None)
    for base models and runs whose training data has no single system prompt.
    """
    if source.run_path is None:
        return None, None
    if source.drop_system:
        return None, "this run was trained without a system prompt; none is sent (--system adds one)"
    prompt = _training_system_prompt(source.run_path)
    if prompt is None:
        return None, None
    return prompt, "using the system prompt this run was trained with (--system '' for none)"


def _training_system_prompt(run_path: Path) -> str | None:
    """The system prompt shared by the run's training examples, if they all have the same one."""
    import itertools

    from tunesmith.data.examples import ExampleStream
    from tunesmith.train.runs import read_manifest

    data = (read_manifest(run_path).get("config") or {}).get("data")
    if not data or not Path(data).is_file():
        return None
    prompts = set()
    for example in itertools.islice(ExampleStream(data), MAX_EXAMPLES_READ):
        system = next((m.get("content") for m in example.messages if m.get("role") == "system"), None)
        prompts.add(system)
        if len(prompts) > 1:
            return None
    prompt = next(iter(prompts), None)
    return prompt if isinstance(prompt, str) and prompt else None
