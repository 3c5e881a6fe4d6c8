"""Pack encoded examples into fixed-budget sequences (the last transform of the data chain).

Greedy, in the given order (shuffle before packing): an example goes into the
current sequence if it fits, otherwise it starts the next one; examples are
never split. ``position_ids`` restart at 0 for every example, and ``seq_lens``
lets attention kernels that support it (flash-attention varlen, SDPA with
position-id masks) keep examples from attending to each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunesmith.data.chat import IGNORE_INDEX, EncodedExample
from tunesmith.errors import TunesmithError


@dataclass
class PackedSequence:
    """Several examples laid end to end.

    Attributes:
        input_ids: the examples' tokens, concatenated.
        labels: their labels; the first token of each example never carries loss.
        position_ids: 0, 1, … restarting at each example.
        seq_lens: the length of each example, in order.
    """

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def add(self, example: EncodedExample) -> None:
        """Append one example."""
        n = len(example.input_ids)
        self.input_ids.extend(example.input_ids)
        # the first token would be "predicted" from the previous example's last one
        self.labels.extend([IGNORE_INDEX] + example.labels[1:])
        self.position_ids.extend(range(n))
        self.seq_lens.append(n)


def pack_examples(encoded: list[EncodedExample], max_length: int) -> list[PackedSequence]:
    """Greedily pack ``encoded`` into sequences of at most ``max_length`` tokens.

    Raises:
        TunesmithError: an example is longer than ``max_length`` (encode with ``max_length`` first).
    """
    if max_length < 1:
        raise TunesmithError(f"max_length must be at least 1, got {max_length}", param="max_length")
    packed: list[PackedSequence] = []
    current = PackedSequence()
    for index, example in enumerate(encoded):
        n = len(example.input_ids)
        if n == 0:
            continue
        if n > max_length:
            raise TunesmithError(f"example {index} has {n} tokens, more than the packing length {max_length}",
                                 "encode with the same max_length so long examples are cut first")
        if len(current) + n > max_length:
            packed.append(current)
            current = PackedSequence()
        current.add(example)
    if len(current):
        packed.append(current)
    return packed
