"""Run the evaluation: every model answers every held-out case, measured the same way.

Greedy decoding, the same token limit, the same machine and the same run for
every model. Models take turns case by case (rather than one model after the
other), so a machine that gets busier or quieter during the run affects all of
them alike; each model answers one warm-up request first, which is not measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from tunesmith.errors import DataError, TunesmithError
from tunesmith.eval.metrics import METRICS, Scored, bootstrap_ci, check_metric, choose_metric
from tunesmith.eval.prompts import Case, cases_from, choose_shots, prompted_messages, trained_messages
from tunesmith.eval.split import answer_of, overlap
from tunesmith.infer import Engine, GenerationSettings

TUNED, PROMPTED = "tuned", "prompted"
MAX_TOKENS_MARGIN = 8
MIN_MAX_TOKENS = 16


@dataclass
class Contender:
    """A model in the comparison and how it is asked.

    Attributes:
        label: the name shown in the report ("smollm2-135m + 3 shots").
        ref: the model reference the engine resolves.
        mode: "tuned" (asked as trained) or "prompted" (instructions + few-shot examples).
    """

    label: str
    ref: str
    mode: str


@dataclass
class Answer:
    """One model's answer to one case and what it cost."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    finish_reason: str


@dataclass
class ModelResult:
    """Everything measured for one model."""

    contender: Contender
    answers: list[Answer]
    scored: Scored
    ci: tuple[float, float]
    drop_system: bool = False

    def summary(self) -> dict:
        """The figures of the report for this model."""
        latency = np.array([a.latency_s for a in self.answers])
        figures = {
            "label": self.contender.label,
            "model": self.contender.ref,
            "mode": self.contender.mode,
            "drop_system": self.drop_system,
            "score": self.scored.score,
            "ci_low": self.ci[0],
            "ci_high": self.ci[1],
            "prompt_tokens_mean": float(np.mean([a.prompt_tokens for a in self.answers])),
            "completion_tokens_mean": float(np.mean([a.completion_tokens for a in self.answers])),
            "latency_p50_s": float(np.percentile(latency, 50)),
            "latency_p95_s": float(np.percentile(latency, 95)),
            "latency_mean_s": float(latency.mean()),
            "stopped_by_length": sum(a.finish_reason == "length" for a in self.answers),
        }
        figures.update({k: v for k, v in self.scored.details.items() if k not in ("labels", "confusion")})
        return figures


@dataclass
class EvalResult:
    """The whole evaluation: cases, models, metric and the notes a reader needs."""

    metric: str
    metric_reason: str
    cases: list[Case]
    results: list[ModelResult]
    shots: list[list[dict]]
    max_tokens: int
    notes: list[str] = field(default_factory=list)
    labels: list[str] | None = None

    def result(self, label: str) -> ModelResult:
        """The result of the model labelled ``label``."""
        return next(r for r in self.results if r.contender.label == label)


Progress = Callable[[str, int, int], None]


@dataclass
class Task:
    """The held-out cases and everything decided about them before any model runs."""

    cases: list[Case]
    metric: str
    metric_reason: str
    labels: list[str] | None
    shots: list[list[dict]]
    instructions: str | None
    notes: list[str]

    @property
    def references(self) -> list[str]:
        """The expected answers, in case order."""
        return [c.reference for c in self.cases]


def evaluate(contenders: list[Contender], heldout: str | Path, *, metric: str = "auto",
             shots: int = 3, examples_from: str | Path | None = None, max_tokens: int | None = None,
             engine: Engine | None = None, progress: Progress | None = None) -> EvalResult:
    """Ask every contender every held-out case and score the answers.

    Args:
        contenders: the models and how each is asked.
        heldout: the held-out data file (any supported format; last assistant message = reference).
        metric: auto, exact, contains, choice or json.
        shots: worked examples for prompted models.
        examples_from: training file the examples come from (needed when shots > 0).
        max_tokens: generation limit; default: the longest reference plus a margin.
        engine: the engine to use (a new one by default).
        progress: called with (stage, done, total).

    Raises:
        TunesmithError / DataError / NotFoundError: a bad metric, file or model, before any generation.
    """
    task = prepare_task(heldout, metric=metric, shots=shots, examples_from=examples_from,
                        needs_shots=any(c.mode == PROMPTED for c in contenders))
    engine = engine or Engine()
    handles = {}
    for contender in contenders:
        _say(progress, f"loading {contender.label}", 0, len(contenders))
        handles[contender.label] = engine.resolve(contender.ref)
    if max_tokens is None:
        longest = max(len(handles[c.label].tokenizer(r, add_special_tokens=False)["input_ids"])
                      for c in contenders for r in task.references)
        max_tokens = max(MIN_MAX_TOKENS, longest + MAX_TOKENS_MARGIN)
    settings = GenerationSettings(max_tokens=max_tokens, temperature=0.0)
    answers = _answer_all(engine, handles, contenders, task, settings, progress)
    results = []
    for contender in contenders:
        scored = METRICS[task.metric]([a.text for a in answers[contender.label]], task.references, task.labels)
        results.append(ModelResult(contender, answers[contender.label], scored, bootstrap_ci(scored.per_example),
                                   drop_system=handles[contender.label].drop_system and contender.mode == TUNED))
    return EvalResult(task.metric, task.metric_reason, task.cases, results, task.shots, max_tokens, task.notes,
                      task.labels)


def prepare_task(heldout: str | Path, *, metric: str, shots: int, examples_from: str | Path | None,
                 needs_shots: bool) -> Task:
    """Read the held-out and training files, choose the metric and the worked examples.

    Raises:
        TunesmithError / DataError: an unknown metric, answers that do not fit it, or shots without a training file.
    """
    from tunesmith.data.examples import load_examples

    check_metric(metric)
    cases = cases_from(load_examples(heldout, min_examples=1), str(heldout))
    references = [c.reference for c in cases]
    train_examples = load_examples(examples_from, min_examples=1) if examples_from is not None else []
    if metric == "auto":
        metric, reason = choose_metric(references, [answer_of(e.messages) for e in train_examples])
    else:
        reason = "chosen with --metric"
    _check_metric_fits(metric, references)
    if needs_shots and shots > 0 and not train_examples:
        raise TunesmithError(f"{shots} few-shot examples were asked for, but there is no training file to take "
                             "them from", "pass --examples-from train.jsonl, or --shots 0", param="examples_from")
    notes: list[str] = []
    duplicates = overlap([c.turns for c in cases], [e.messages for e in train_examples])
    if duplicates:
        notes.append(f"warning: {len(duplicates)} of {len(cases)} held-out examples also appear in "
                     f"{examples_from}; the fine-tuned model may have seen their answers "
                     "(split with: tunesmith data split)")
    shot_list = choose_shots(train_examples, shots, labelled=metric == "choice", avoid=cases)
    if shots > len(shot_list):
        notes.append(f"only {len(shot_list)} usable few-shot examples in {examples_from}")
    return Task(cases, metric, reason, _labels(metric, references, train_examples), shot_list,
                _instructions(cases, train_examples), notes)


def _answer_all(engine: Engine, handles: dict, contenders: list[Contender], task: Task,
                settings: GenerationSettings, progress: Progress | None) -> dict[str, list[Answer]]:
    """Every contender answers every case, taking turns case by case, after one unmeasured warm-up each."""

    def request(contender: Contender, case: Case) -> list[dict]:
        if contender.mode == TUNED:
            return trained_messages(case, handles[contender.label].drop_system)
        return prompted_messages(case, task.shots, task.instructions)

    for contender in contenders:
        engine.chat(handles[contender.label], request(contender, task.cases[0]), settings)
    answers: dict[str, list[Answer]] = {c.label: [] for c in contenders}
    total = len(task.cases) * len(contenders)
    for i, case in enumerate(task.cases):
        for j, contender in enumerate(contenders):
            done = engine.chat(handles[contender.label], request(contender, case), settings)
            answers[contender.label].append(Answer(done.text, done.prompt_tokens, done.completion_tokens,
                                                   done.latency_s, done.finish_reason))
            _say(progress, "answering", i * len(contenders) + j + 1, total)
    return answers


def _labels(metric: str, references: list[str], train_examples) -> list[str] | None:
    if metric != "choice":
        return None
    train_answers = [answer_of(e.messages) for e in train_examples]
    return sorted(set(references) | {a for a in train_answers if a})


def _check_metric_fits(metric: str, references: list[str]) -> None:
    """A held-out file whose answers do not fit the metric is refused before any generation."""
    if metric == "json":
        METRICS["json"](references, references)  # raises DataError naming the first bad reference
    if metric == "choice":
        distinct = len(set(references))
        if distinct > 200 or (len(references) > 20 and distinct > len(references) * 0.9):
            raise DataError(f"metric 'choice' needs answers that are labels, but the {len(references)} held-out "
                            f"answers take {distinct} distinct values",
                            hint="choose --metric exact or contains for free-text answers")


def _instructions(cases: list[Case], train_examples) -> str | None:
    """The task's instructions for prompted models: the held-out system prompt, else the training one."""
    for case in cases:
        if case.system:
            return case.system
    for example in train_examples:
        for message in example.messages:
            if message.get("role") == "system" and message.get("content"):
                return str(message["content"])
    return None


def _say(progress: Progress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)
