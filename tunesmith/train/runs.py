"""Run folders: what a training run leaves on disk, and finding runs again.

A run folder (``runs/<name>/``) holds ``manifest.json`` (config, resolved
hyperparameters, base model, status, timings, tokens), ``metrics.csv``,
``loss.png``, ``checkpoints/step-N/`` and, once the run has finished,
``final/``. The manifest's status is ``running``, ``interrupted``, ``failed``
or ``succeeded``; only a succeeded run with a ``final/`` folder is a model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tunesmith import settings
from tunesmith.atomic import write_json
from tunesmith.errors import NotFoundError, TunesmithError

MANIFEST = "manifest.json"
FINAL = "final"
CHECKPOINTS = "checkpoints"
METRICS_CSV = "metrics.csv"
LOSS_PNG = "loss.png"
FINAL_INFO = "tunesmith_run.json"  # inside final/: what a loader needs without the run folder
MANIFEST_FORMAT = "tunesmith-run/1"

RUNNING, INTERRUPTED, FAILED, SUCCEEDED = "running", "interrupted", "failed", "succeeded"


@dataclass
class Run:
    """A run folder and its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.manifest.get("name") or self.path.name

    @property
    def status(self) -> str:
        return self.manifest.get("status", RUNNING)

    @property
    def finished(self) -> bool:
        """True only for a run that succeeded and whose final/ folder is complete."""
        return self.status == SUCCEEDED and (self.path / FINAL / FINAL_INFO).is_file()

    @property
    def final_dir(self) -> Path | None:
        return self.path / FINAL if self.finished else None

    @property
    def method(self) -> str:
        return self.manifest.get("method") or self.manifest.get("config", {}).get("method", "")

    @property
    def is_adapter(self) -> bool:
        return bool(self.manifest.get("is_adapter"))

    @property
    def base_model(self) -> str:
        """A reference ``resolve_model`` accepts: the model the adapter applies to
        (LoRA family) or that the weights started from (full)."""
        base = self.manifest.get("base_model") or {}
        return base.get("ref") or base.get("path") or ""

    @property
    def drop_system(self) -> bool:
        return bool(self.manifest.get("drop_system"))

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        return list_checkpoints(self.path)


def utc_now() -> str:
    """The current time as an ISO 8601 UTC string (manifest timestamps)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def is_run_dir(path: Path) -> bool:
    """A folder is a run when it holds a tunesmith manifest."""
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the run folder ``path``.

    Raises:
        TunesmithError: the folder is not a run, or its manifest is unreadable.
    """
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TunesmithError(f"{path} is not a tunesmith run (no {MANIFEST})",
                             "pass a folder written by tunesmith train, or a run name from: tunesmith runs list"
                             ) from None
    except (OSError, ValueError) as exc:
        raise TunesmithError(f"the run manifest {path / MANIFEST} cannot be read: {exc}",
                             "the run folder is damaged; train again") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise TunesmithError(f"{path / MANIFEST} is not a tunesmith run manifest",
                             "pass a folder written by tunesmith train")
    return manifest


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest atomically, stamping ``updated_at``."""
    manifest["updated_at"] = utc_now()
    write_json(Path(path) / MANIFEST, manifest)


def run_roots() -> list[Path]:
    """Where runs are looked up by name: ``./runs`` then ``TUNESMITH_HOME/runs``."""
    roots = [settings.default_runs_dir(), settings.home() / "runs"]
    unique: list[Path] = []
    for root in roots:
        if root.resolve() not in [r.resolve() for r in unique]:
            unique.append(root)
    return unique


def find_run_dir(ref: str) -> Path | None:
    """The run folder ``ref`` names (a folder path, its final/ folder, or a run name), or None."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if is_run_dir(path):
            return path
        if path.name == FINAL and is_run_dir(path.parent):
            return path.parent
        return None
    if os.sep in ref or ref in (".", ".."):
        return None
    for root in run_roots():
        if is_run_dir(root / ref):
            return root / ref
    return None


def resolve_run(ref: str, *, require_finished: bool = True) -> Run:
    """Find a run by folder path or by name under ``./runs`` and ``TUNESMITH_HOME/runs``.

    Args:
        ref: a run folder, its ``final/`` folder, or a run name.
        require_finished: refuse runs that have not succeeded (they are not models).

    Returns:
        The run.

    Raises:
        NotFoundError: nothing by that name or path.
        TunesmithError: the folder is not a run, or the run never finished.
    """
    found = find_run_dir(ref)
    if found is None:
        path = Path(ref).expanduser()
        if path.is_dir():
            raise TunesmithError(f"{path} is not a tunesmith run (no {MANIFEST})",
                                 "pass a run folder written by tunesmith train, or a name from: tunesmith runs list")
        if os.sep in ref:
            raise NotFoundError(f"run folder {path} does not exist", "see: tunesmith runs list")
        roots = " or ".join(str(r) for r in run_roots())
        raise NotFoundError(f"no run called {ref!r} (looked in {roots})", "see: tunesmith runs list")
    run = Run(found.resolve(), read_manifest(found))
    if require_finished and not run.finished:
        raise TunesmithError(
            f"run {run.name} never finished (status: {run.status}); it is not a model",
            f"resume it: tunesmith train --out {found} --resume" if run.status != SUCCEEDED
            else f"its {FINAL}/ folder is missing or incomplete; train again",
        )
    return run


def resumable_run_dir(out: str | Path) -> Path:
    """The run folder ``out``, checked to be a run that can be resumed.

    Raises:
        NotFoundError: ``out`` does not exist.
        TunesmithError: ``out`` is not a run, or the run already finished.
    """
    path = Path(out).expanduser().resolve()
    if not path.exists():
        raise NotFoundError(f"nothing to resume: {path} does not exist", "drop --resume to start a new run")
    if not is_run_dir(path):
        raise TunesmithError(f"{path} is not a tunesmith run (no {MANIFEST}), so it cannot be resumed",
                             "pass the folder of an interrupted run to --out")
    if read_manifest(path).get("status") == SUCCEEDED:
        raise TunesmithError(f"run {path.name} already finished; there is nothing to resume",
                             f"fine-tune it further with: tunesmith train --model {path} --data NEW.jsonl")
    return path


def list_runs(root: Path) -> list[Run]:
    """Every run folder directly under ``root``, oldest first (unreadable ones are skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = []
    for child in root.iterdir():
        if child.is_dir() and is_run_dir(child):
            try:
                runs.append(Run(child.resolve(), read_manifest(child)))
            except TunesmithError:
                continue
    return sorted(runs, key=lambda r: (r.manifest.get("created_at", ""), r.name))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (those whose ``checkpoint.json`` exists), by step."""
    from tunesmith.train.checkpoint import CHECKPOINT_INFO, step_of

    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and (p / CHECKPOINT_INFO).is_file()
             and step_of(p) is not None]
    return sorted(found, key=step_of)
