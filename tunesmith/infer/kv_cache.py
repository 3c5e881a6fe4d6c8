"""A transformers ``DynamicCache`` whose layers append in place.

``DynamicLayer.update`` concatenates the new token's keys and values to the whole
cache at every step: every decode step copies the full cache of every layer
(15% of a step for a batch of 8 at 100 tokens on a CPU, growing with the length).
Here each layer keeps its keys and values in a buffer with spare columns and
appends into it; ``keys``/``values`` stay plain tensors (views of the buffer), so
everything else transformers and the scheduler do with a cache still works. When
they replace ``keys``/``values`` (merging rows, dropping rows, trimming padding),
the next append moves the new tensors into a fresh buffer.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

SPARE_COLUMNS = 64  # columns reserved ahead; a full buffer grows by half its size or this, whichever is more


class AppendingLayer(DynamicLayer):
    """A ``DynamicLayer`` that appends into a preallocated buffer instead of concatenating."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the new states; returns all keys and values (views of the buffers)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.keys.shape[-2] if self.keys.numel() else 0
        needed = length + key_states.shape[-2]
        if not self._owns(self.keys, self._key_buffer, needed) \
                or not self._owns(self.values, self._value_buffer, needed):
            capacity = needed + max(SPARE_COLUMNS, needed // 2)
            self._key_buffer = _buffer(self.keys, key_states, length, capacity)
            self._value_buffer = _buffer(self.values, value_states, length, capacity)
        self._key_buffer[:, :, length:needed].copy_(key_states)
        self._value_buffer[:, :, length:needed].copy_(value_states)
        self.keys = self._key_buffer[:, :, :needed]
        self.values = self._value_buffer[:, :, :needed]
        return self.keys, self.values

    @staticmethod
    def _owns(current: torch.Tensor, buffer: torch.Tensor | None, needed: int) -> bool:
        """``current`` is the start of ``buffer`` (nobody replaced it) and ``needed`` columns fit."""
        if buffer is None or needed > buffer.shape[-2]:
            return False
        if current.numel() == 0:
            return True
        return current.data_ptr() == buffer.data_ptr() and current.shape[:2] == buffer.shape[:2] \
            and current.stride() == buffer.stride()


def _buffer(current: torch.Tensor, new: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
    shape = (*new.shape[:-2], capacity, new.shape[-1])
    buffer = torch.empty(shape, dtype=new.dtype, device=new.device)
    if length:
        buffer[:, :, :length].copy_(current)
    return buffer


def appending_cache() -> DynamicCache:
    """An empty ``DynamicCache`` whose layers (created on first use) are :class:`AppendingLayer`."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = AppendingLayer
    return cache
