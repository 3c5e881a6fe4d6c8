"""Training data for the loop: encoded examples, the validation slice, and batches.

The data layer renders each conversation with the chat template and masks
every token but the trained assistant turns (label -100). Here the examples
are split, ordered per epoch by a seeded generator (so a resumed run sees
exactly the order an uninterrupted one does). The loop packs them into batches
(``train.fast.pack_batches``); :func:`collate` pads them, the plain path the
packed one is tested against.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from tunesmith.errors import DataError
from tunesmith.train.config import TrainConfig

MIN_TRAINING_EXAMPLES = 10
IGNORE_INDEX = -100


@dataclass
class Sample:
    """One encoded conversation: token ids and labels (-100 where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]
    line: int | None = None

    @property
    def labelled(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class TrainingData:
    """What the loop trains and validates on.

    Attributes:
        train, valid: encoded samples (``valid`` may be empty).
        notes: things the user should know (truncations, skipped examples, replay).
        fingerprint: SHA-256 of the training file, to tell a changed file on resume.
        replayed: how many of ``train`` are earlier examples (continued fine-tuning).
    """

    train: list[Sample]
    valid: list[Sample]
    notes: list[str] = field(default_factory=list)
    fingerprint: str = ""
    replayed: int = 0


@dataclass
class Batch:
    """Padded tensors for one forward pass."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    tokens: int  # real tokens (padding excluded)
    labelled: int  # tokens that carry loss (after the one-token shift)

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     self.tokens, self.labelled)


def file_fingerprint(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def encode_file(path: str | Path, tokenizer, config: TrainConfig, *, role: str) -> tuple[list[Sample], list[str]]:
    """Read, optionally drop the system prompt, and encode every example of a file.

    Returns:
        (samples that carry loss, notes about truncated or skipped examples).

    Raises:
        DataError: the file cannot be used (the data layer lists each problem).
    """
    from tunesmith.data import encode_examples, load_examples

    # The training file must hold at least 10 examples (the hosted APIs' rule); a validation file may be small.
    examples = load_examples(path, min_examples=MIN_TRAINING_EXAMPLES if role == "training" else 1)
    samples, notes, truncated, empty = [], [], 0, []
    encoded_all = encode_examples(tokenizer, examples, max_length=config.max_length,
                                  without_system=config.drop_system)
    for example, encoded in zip(examples, encoded_all):
        sample = Sample(_ints(encoded.input_ids), _ints(encoded.labels), example.line)
        truncated += 1 if encoded.truncated_tokens else 0
        if sample.labelled == 0:
            empty.append(str(sample.line))
            continue
        samples.append(sample)
    if truncated:
        notes.append(f"{role}: {truncated} of {len(examples)} examples were longer than max_length="
                     f"{config.max_length} tokens and were truncated")
    if empty:
        notes.append(f"{role}: skipped {len(empty)} example(s) with no trained assistant tokens left "
                     f"(lines {', '.join(empty[:10])}{'…' if len(empty) > 10 else ''})")
    if not samples:
        raise DataError(f"{path}: no example has assistant tokens to train on",
                        hint="check the assistant messages (weight 1) and --max-length")
    return samples, notes


def build_data(config: TrainConfig, tokenizer, *, replay: float = 0.0,
               replay_files: Sequence[Path] = ()) -> TrainingData:
    """Encode the training data and pick the validation set (file, held-out slice, or none).

    Args:
        replay: earlier examples mixed in per new training example (continued fine-tuning).
        replay_files: where the earlier examples come from.

    Raises:
        DataError: unusable data, or fewer than 10 training examples.
    """
    train, notes = encode_file(config.data, tokenizer, config, role="training")
    if len(train) < MIN_TRAINING_EXAMPLES:
        raise DataError(f"{config.data}: {len(train)} usable training examples; at least "
                        f"{MIN_TRAINING_EXAMPLES} are needed", hint="add more examples")
    valid: list[Sample] = []
    if config.validation:
        valid, valid_notes = encode_file(config.validation, tokenizer, config, role="validation")
        notes += valid_notes
    elif config.validation_split > 0:
        train, valid = split_held_out(train, config.validation_split, config.seed)
        notes.append(f"held out {len(valid)} of {len(train) + len(valid)} training examples for validation")
    replayed = replay_samples(replay_files, tokenizer, config, round(replay * len(train))) if replay > 0 else []
    if replayed:
        notes.append(f"replaying {len(replayed)} examples of the earlier training data alongside the "
                     f"{len(train)} new ones, so the model keeps what it learned (--replay 0 to train on "
                     "the new data alone)")
    return TrainingData(train=train + replayed, valid=valid, notes=notes, fingerprint=file_fingerprint(config.data),
                        replayed=len(replayed))


def replay_samples(files: Sequence[Path], tokenizer, config: TrainConfig, count: int) -> list[Sample]:
    """``count`` examples (at most all of them) drawn by ``config.seed`` from earlier training files."""
    pool: list[Sample] = []
    for path in files:
        pool += encode_file(path, tokenizer, config, role="replay")[0]
    return random.Random(config.seed).sample(pool, min(count, len(pool)))


def split_held_out(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split off ``fraction`` of the samples (at least one), chosen by ``seed``."""
    indices = list(range(len(samples)))
    random.Random(seed).shuffle(indices)
    n_valid = min(len(samples) - 1, max(1, round(len(samples) * fraction)))
    held = set(indices[:n_valid])
    return ([s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held])


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of ``epoch``: a permutation from its own seeded generator."""
    generator = torch.Generator().manual_seed(seed * 10_007 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def collate(samples: Sequence[Sample], pad_id: int) -> Batch:
    """Right-pad samples to the longest one; padding gets label -100 and attention 0."""
    width = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        length = len(sample.input_ids)
        input_ids[row, :length] = torch.tensor(sample.input_ids)
        labels[row, :length] = torch.tensor(sample.labels)
        attention[row, :length] = 1
    labelled = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return Batch(input_ids, attention, labels, tokens=int(attention.sum()), labelled=labelled)


def group(batches: list[Batch], accumulation: int) -> list[list[Batch]]:
    """Consecutive batches that make one optimizer step each (the last group may be short)."""
    return [batches[i:i + accumulation] for i in range(0, len(batches), accumulation)]


def _ints(values) -> list[int]:
    return values.tolist() if hasattr(values, "tolist") else [int(v) for v in values]
