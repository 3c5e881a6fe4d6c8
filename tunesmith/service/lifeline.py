"""Tie a process's life to its parent's: when the parent dies, even by SIGKILL, so does the child.

A worker's training child (and ``tunesmith serve``'s workers) must not outlive
their parent: an orphan would keep training a job that another worker is about
to resume. Linux's PR_SET_PDEATHSIG does it in the kernel; elsewhere the
training child also checks its parent id at every step.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
PARENT_ENV = "TUNESMITH_PARENT_PID"


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent exits; exit now if it already has."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the parent check below still applies
            pass
    if parent_gone():
        os._exit(1)


def parent_gone() -> bool:
    """True when the parent named in TUNESMITH_PARENT_PID is no longer our parent."""
    expected = os.environ.get(PARENT_ENV)
    return expected is not None and expected.isdigit() and os.getppid() != int(expected)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child of this process (records our pid as its parent)."""
    env = dict(os.environ)
    env[PARENT_ENV] = str(os.getpid())
    env.update(extra or {})
    return env
