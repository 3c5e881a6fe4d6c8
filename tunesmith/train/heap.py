"""The C heap during a training loop: freed memory stays with the process for the next step.

A training step allocates and frees the same activations every step: hundreds of
MB, in tensors of a few MB each. glibc malloc, left to itself, hands the large
ones back to the kernel when they are freed (``mmap``/``munmap`` above a threshold,
and a trim of the heap's top above another), so the next step takes a page fault
for every 4 KB it touches again: 38,000-138,000 faults a step for LoRA on
SmolLM2 at 1,100 tokens, against 1,900 with the settings below; the step ran
4-17% faster in six of seven side-by-side pairs (bench/RESULTS.md). PyTorch's CPU
allocator is plain ``malloc``, so the fix is two ``mallopt`` settings for the
duration of the loop, and a ``malloc_trim`` after it to give the memory back.

Only glibc has ``mallopt``; elsewhere (macOS, musl) this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from typing import Iterator

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Allocations up to this size come from the heap, not a fresh mapping of their own.
# glibc's own threshold adapts, but only up to 32 MiB, and setting the trim threshold
# turns the adaptation off: both are set together.
MMAP_THRESHOLD = 512 << 20
# Free memory at the heap's top is returned to the kernel only above this (the largest
# value mallopt takes: a C int).
TRIM_THRESHOLD = (1 << 31) - 1
# After the loop: where glibc's adaptive thresholds end up in a process that has freed
# large blocks (its 32 MiB ceiling, and twice that for the trim). Its initial 128 KiB
# cannot come back: fixed, it would send every tensor over 128 KiB to a fresh mapping.
AFTER_MMAP_THRESHOLD = 32 << 20
AFTER_TRIM_THRESHOLD = 64 << 20


@functools.cache
def _glibc():
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def _set(libc, mmap_threshold: int, trim_threshold: int) -> bool:
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD,
                                                                                      trim_threshold))


@contextlib.contextmanager
def kept_heap() -> Iterator[bool]:
    """Within the block, freed memory stays in the process's heap; yields whether the C library allowed it.

    After the block the thresholds drop to where glibc's own adaptation would
    leave them and the freed memory is returned to the kernel, so a long-lived
    process (a notebook, an evaluation after training) does not hold the loop's
    peak. The settings are process-wide: overlapping blocks in two threads stay
    correct, only the later part of the longer one runs with the "after" values.
    """
    libc = _glibc()
    if libc is None:
        yield False
        return
    if not _set(libc, MMAP_THRESHOLD, TRIM_THRESHOLD):
        _set(libc, AFTER_MMAP_THRESHOLD, AFTER_TRIM_THRESHOLD)  # no half of the setting stays behind
        yield False
        return
    try:
        yield True
    finally:
        _set(libc, AFTER_MMAP_THRESHOLD, AFTER_TRIM_THRESHOLD)
        libc.malloc_trim(0)
