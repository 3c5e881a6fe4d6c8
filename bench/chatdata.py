"""A generated chat data set for the benchmarks: seeded, so every run trains on the same tokens.

Each conversation has a system line, a user request and an assistant answer made of
common English words; its rendered length is drawn uniformly between ``min_len`` and
``max_len`` tokens, and the answer is 20-40% of it, as in typical instruction data.
"""

from __future__ import annotations

import random

WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part over new sound take only little work know place year live me back give most very "
    "after thing our just name good sentence man think say great where help through much before line right "
    "too mean old any same tell boy follow came want show also around form three small set put end does "
    "another well large must big even such because turn here why ask went men read need land different home "
    "us move try kind hand picture again change off play spell air away animal house point page letter "
    "mother answer found study still learn should america world"
).split()


def _text(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(max(1, n_words))]
    words[0] = words[0].capitalize()
    return " ".join(words) + "."


def make_conversations(n: int, *, min_len: int = 140, max_len: int = 440, seed: int = 0) -> list[dict]:
    """``n`` OpenAI-style chat examples (``{"messages": [...]}``) of roughly ``min_len..max_len`` tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        total = rng.randint(min_len, max_len)
        answer = int(total * rng.uniform(0.2, 0.4))
        overhead = 22  # template tokens and the system line
        prompt = max(8, total - answer - overhead)
        # about one token per word for this vocabulary with SmolLM2's and Gemma's tokenizers
        out.append({"messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": _text(rng, int(prompt / 1.0))},
            {"role": "assistant", "content": _text(rng, int(answer / 1.0))},
        ]})
    return out


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids and labels (``-100`` on everything but the assistant's answer) for one conversation."""
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    if full[:len(prompt)] != prompt:
        raise ValueError("the chat template renders the prompt differently with the answer attached")
    labels = [-100] * len(prompt) + list(full[len(prompt):])
    if max_length is not None:
        full, labels = full[:max_length], labels[:max_length]
    return list(full), labels
