"""Which models an evaluation compares, from what the user named.

The fine-tuned model is asked as it was trained; its base (named with ``--base``,
or read from the run) and any ``--baseline`` models are prompted with
instructions and worked examples taken from the run's training file unless
another one is named.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import NotFoundError, TunesmithError
from tunesmith.eval.runner import PROMPTED, TUNED, Contender
from tunesmith.infer.resolve import locate


@dataclass
class EvalPlan:
    """The contenders and where the few-shot examples come from."""

    contenders: list[Contender]
    examples_from: Path | None


def plan_eval(*, tuned: str | None, base: str | None, baselines: list[str], shots: int,
              examples_from: str | Path | None) -> EvalPlan:
    """Resolve the models (without loading them) and the examples file.

    Raises:
        NotFoundError: a model or run that does not exist, or a missing examples file.
        TunesmithError: nothing to evaluate, or no base model known for a plain model folder.
    """
    if shots < 0:
        raise TunesmithError(f"--shots must be 0 or more, got {shots}", "pass --shots 3, or 0 for none",
                             param="shots")
    if tuned is None and base is None:
        raise TunesmithError("nothing to evaluate", "pass --tuned RUN (and optionally --base MODEL)", param="tuned")
    contenders: list[Contender] = []
    run_data = None
    if tuned is not None:
        source = locate(tuned)
        run = _run_of(source)
        if base is None:
            base = _base_ref(source, run)
        run_data = _training_file(run)
        contenders.append(Contender(f"{source.name} (tuned)", tuned, TUNED))
    if base is not None:
        locate(base)
        contenders.append(Contender(f"{_short(base)} + {shots} shots" if shots else f"{_short(base)} (prompted)",
                                    base, PROMPTED))
    for other in baselines:
        locate(other)
        contenders.append(Contender(f"{_short(other)} + {shots} shots" if shots else f"{_short(other)} (prompted)",
                                    other, PROMPTED))
    _unique_labels(contenders)
    if examples_from is None and shots > 0 and any(c.mode == PROMPTED for c in contenders):
        if run_data is None:
            raise TunesmithError("the prompted models need worked examples, and no training file is known",
                                 "pass --examples-from train.jsonl (or --shots 0)", param="examples_from")
        if not Path(run_data).is_file():
            raise NotFoundError(f"the run's training file {run_data} no longer exists, so no worked examples "
                                "can be taken from it", "pass --examples-from train.jsonl", param="examples_from")
        examples_from = run_data
    if examples_from is not None and not Path(examples_from).is_file():
        raise NotFoundError(f"examples file {examples_from} does not exist", "check the path",
                            param="examples_from")
    return EvalPlan(contenders, Path(examples_from) if examples_from is not None else None)


def _run_of(source):
    if source.run_path is None:
        return None
    from tunesmith.train.runs import Run, read_manifest

    return Run(source.run_path, read_manifest(source.run_path))


def _base_ref(source, run) -> str:
    if run is not None and run.base_model:
        return run.base_model
    raise TunesmithError(f"{source.ref} is not a tunesmith run, so its base model is unknown",
                         "pass --base MODEL (the model it was fine-tuned from)", param="base")


def _training_file(run) -> str | None:
    if run is None:
        return None
    config = run.manifest.get("config") or {}
    return config.get("data")


def _short(ref: str) -> str:
    path = Path(ref)
    return path.name if path.is_dir() else ref


def _unique_labels(contenders: list[Contender]) -> None:
    seen: dict[str, int] = {}
    for contender in contenders:
        count = seen.get(contender.label, 0)
        seen[contender.label] = count + 1
        if count:
            contender.label = f"{contender.label} #{count + 1}"
