"""The C heap keeps freed pages during a training loop and gives them back after it."""

import os
import resource
import sys

import pytest
import torch

from tunesmith.train import heap

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or heap._glibc() is None,
                                reason="mallopt is glibc's")

PAGE = os.sysconf("SC_PAGE_SIZE")


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def _touch_and_free(count: int, size: int) -> None:
    """A step's worth of activations: ``count`` tensors of ``size`` bytes, written, then all freed."""
    tensors = [torch.ones(size // 4, dtype=torch.float32) for _ in range(count)]
    del tensors


def test_a_freed_activation_is_reused_without_page_faults():
    # 48 MiB is past the 32 MiB ceiling of glibc's adaptive mmap threshold: left to itself, glibc
    # maps such a tensor afresh and faults in every page of it, every step
    with heap.kept_heap() as kept:
        assert kept
        for _ in range(6):  # the first steps map the pages (and settle where the heap's free blocks lie)
            _touch_and_free(4, 48 << 20)
        before = _faults()
        for _ in range(3):  # the next ones find them in the heap
            _touch_and_free(4, 48 << 20)
        faults = _faults() - before
    pages = 3 * 4 * (48 << 20) // PAGE
    assert faults < pages // 10, f"{faults} page faults for {pages} pages reused"


def test_the_memory_goes_back_after_the_block():
    with heap.kept_heap():
        _touch_and_free(32, 8 << 20)
        held = _resident_bytes()
    released = held - _resident_bytes()
    assert released > (32 * (8 << 20)) * 3 // 4, f"only {released >> 20} MiB of 256 MiB released"


class _RefusingLibc:
    """A C library whose mallopt refuses the trim threshold: a refusal a real glibc gives only for
    values out of its range, so it cannot be caused here otherwise."""

    def __init__(self):
        self.settings = {}

    def mallopt(self, option, value):
        if option == heap.M_TRIM_THRESHOLD and value == heap.TRIM_THRESHOLD:
            return 0
        self.settings[option] = value
        return 1

    def malloc_trim(self, pad):
        raise AssertionError("nothing to trim when the settings were refused")


def test_a_refused_setting_leaves_no_half_of_it_behind(monkeypatch):
    libc = _RefusingLibc()
    monkeypatch.setattr(heap, "_glibc", lambda: libc)
    with heap.kept_heap() as kept:
        assert not kept
    assert libc.settings == {heap.M_MMAP_THRESHOLD: heap.AFTER_MMAP_THRESHOLD,
                             heap.M_TRIM_THRESHOLD: heap.AFTER_TRIM_THRESHOLD}
