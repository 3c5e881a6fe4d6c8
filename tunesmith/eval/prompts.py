"""What each model is asked: held-out cases, few-shot examples, and the prompt per model.

A prompted model (the base, a baseline) gets the task's instructions (the system
prompt) and K worked examples before each held-out input; a fine-tuned model gets
the input the way it was trained: without the system prompt when training dropped
it. The few-shot examples are chosen once, deterministically, and are the same for
every prompted model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tunesmith.errors import DataError
from tunesmith.eval.split import answer_of, prompt_key


@dataclass
class Case:
    """One held-out example.

    Attributes:
        line: where it is in the held-out file.
        system: its instructions (system prompt), if any.
        turns: the conversation before the answer, without the system prompt.
        reference: the expected answer (the last assistant message).
    """

    line: int
    system: str | None
    turns: list[dict]
    reference: str

    @property
    def input_text(self) -> str:
        """The last user message: how the case is shown in reports."""
        users = [m for m in self.turns if m.get("role") == "user"]
        return str(users[-1].get("content") or "") if users else ""


def cases_from(examples, source: str) -> list[Case]:
    """Held-out cases from loaded examples (their last assistant message is the reference).

    Raises:
        DataError: an example has no assistant answer to compare with.
    """
    cases, problems = [], []
    for example in examples:
        messages = example.messages
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None or not str(messages[last].get("content") or "").strip():
            problems.append(f"{source}:{example.line}: no assistant answer to compare the models' answers with")
            continue
        before = messages[:last]
        system = next((str(m["content"]) for m in before if m.get("role") == "system"), None)
        turns = [_plain(m) for m in before if m.get("role") != "system"]
        cases.append(Case(example.line, system, turns, str(messages[last]["content"])))
    if problems:
        raise DataError(f"{source} cannot be used as held-out data", problems,
                        "every held-out example needs the expected answer as its last assistant message")
    return cases


def choose_shots(train_examples, k: int, *, labelled: bool, avoid: list[Case], seed: int = 0) -> list[list[dict]]:
    """``k`` worked examples from the training set, the same on every call with the same inputs.

    Args:
        train_examples: loaded training examples.
        k: how many.
        labelled: the task is classification: take examples of different labels first.
        avoid: held-out cases whose prompt must not be used as an example.
        seed: the choice's seed.

    Returns:
        each shot's messages (user ... assistant), system prompt removed.
    """
    if k <= 0:
        return []
    banned = {prompt_key(c.turns + [{"role": "assistant", "content": c.reference}]) for c in avoid}
    pool = [e for e in train_examples if answer_of(e.messages) and prompt_key(e.messages) not in banned]
    rng = random.Random(seed)
    order = list(range(len(pool)))
    rng.shuffle(order)
    if labelled:
        picked, seen = [], set()
        for i in order:  # one example per label first, then any
            label = answer_of(pool[i].messages)
            if label not in seen:
                seen.add(label)
                picked.append(i)
        picked += [i for i in order if i not in picked]
        order = picked
    return [_shot(pool[i].messages) for i in order[:k]]


def _shot(messages: list[dict]) -> list[dict]:
    last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
    return [_plain(m) for m in messages[: last + 1] if m.get("role") != "system"]


def _plain(message: dict) -> dict:
    """role + content only: weights and other training fields are not part of a prompt."""
    return {"role": message["role"], "content": str(message.get("content") or "")}


def prompted_messages(case: Case, shots: list[list[dict]], instructions: str | None) -> list[dict]:
    """A prompted model's request: instructions, then the worked examples, then the input."""
    system = case.system if case.system is not None else instructions
    messages = [{"role": "system", "content": system}] if system else []
    for shot in shots:
        messages += shot
    return messages + case.turns


def trained_messages(case: Case, drop_system: bool) -> list[dict]:
    """A fine-tuned model's request: the input as in training (no system prompt if it was dropped)."""
    if drop_system or case.system is None:
        return list(case.turns)
    return [{"role": "system", "content": case.system}] + case.turns
