"""Where tunesmith keeps its state.

``TUNESMITH_HOME`` (default ``~/.tunesmith``) holds the model cache, uploaded
files, service runs and the SQLite database. ``TUNESMITH_MODELS_DIR`` can point
the model cache elsewhere (tests share one cache across temporary homes).
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The tunesmith state folder (created on first use)."""
    path = Path(os.environ.get("TUNESMITH_HOME") or Path.home() / ".tunesmith").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    """The cache of converted base models."""
    override = os.environ.get("TUNESMITH_MODELS_DIR")
    path = Path(override).expanduser() if override else home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_runs_dir() -> Path:
    """Where ``tunesmith train`` writes runs when ``--out`` is not given: ``./runs``."""
    return Path.cwd() / "runs"
