"""Self-describing checkpoints, written atomically, and resuming from them.

``checkpoints/step-N/`` holds:
- the trained weights in the method's standard form (a PEFT adapter folder or a
  full model folder), so a checkpoint can be loaded like a finished model;
- ``training_state.pt``: optimizer, scheduler, RNG states (python, numpy,
  torch, CUDA) and the current epoch's data order;
- ``checkpoint.json`` (written last): step, epoch, position in the epoch,
  tokens, elapsed time, metrics, the config and resolved hyperparameters.

The folder is built under a temporary name and renamed into place, so a
checkpoint either exists completely or not at all. Older checkpoints keep their
weights but drop their optimizer state, which only the newest one needs.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunesmith.atomic import atomic_dir
from tunesmith.errors import TunesmithError

CHECKPOINT_INFO = "checkpoint.json"
TRAINING_STATE = "training_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Progress:
    """Where training is: enough to continue exactly from here.

    Attributes:
        step: optimizer steps done.
        epoch: the epoch in progress (0-based).
        group_in_epoch: accumulation groups of this epoch already trained.
        data_order: the example order of this epoch.
        trained_tokens: tokens seen so far (padding excluded).
        elapsed_s: training time so far, across resumes.
    """

    step: int = 0
    epoch: int = 0
    group_in_epoch: int = 0
    data_order: list[int] = field(default_factory=list)
    trained_tokens: int = 0
    elapsed_s: float = 0.0


def step_of(folder: Path) -> int | None:
    """The step number of a ``step-N`` folder, or None."""
    match = _STEP_DIR.match(Path(folder).name)
    return int(match.group(1)) if match else None


def rng_state() -> dict[str, Any]:
    """Every random generator training draws from (dropout, shuffles)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generators saved by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, *, method, model, optimizer, scheduler, progress: Progress,
                    info: dict[str, Any]) -> Path:
    """Write ``checkpoints/step-N`` atomically and trim older checkpoints' optimizer state.

    Args:
        run_dir: the run folder.
        method: the training method (it writes the weights).
        model, optimizer, scheduler: the training objects.
        progress: where training is.
        info: JSON-ready extras for ``checkpoint.json`` (config, resolved, metrics).

    Returns:
        The checkpoint folder.
    """
    target = Path(run_dir) / "checkpoints" / f"step-{progress.step}"
    with atomic_dir(target) as tmp:
        method.save_weights(model, tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng_state(), "data_order": list(progress.data_order)}, tmp / TRAINING_STATE)
        record = {k: v for k, v in asdict(progress).items() if k != "data_order"}
        (tmp / CHECKPOINT_INFO).write_text(json.dumps({**record, **info}, indent=2) + "\n", encoding="utf-8")
    _drop_old_training_state(target)
    return target


def _drop_old_training_state(newest: Path) -> None:
    for folder in newest.parent.iterdir():
        if folder != newest and step_of(folder) is not None and (folder / TRAINING_STATE).exists():
            (folder / TRAINING_STATE).unlink()


def latest_resumable(run_dir: Path) -> Path | None:
    """The newest complete checkpoint that still has its training state, or None."""
    from tunesmith.train.runs import list_checkpoints

    resumable = [p for p in list_checkpoints(run_dir) if (p / TRAINING_STATE).is_file()]
    return resumable[-1] if resumable else None


def read_checkpoint_info(folder: Path) -> dict[str, Any]:
    """``checkpoint.json`` of a checkpoint folder."""
    return json.loads((Path(folder) / CHECKPOINT_INFO).read_text(encoding="utf-8"))


def load_checkpoint(folder: Path, *, method, model, optimizer, scheduler) -> Progress:
    """Restore weights, optimizer, scheduler and RNG from ``folder``.

    Returns:
        The progress to continue from.

    Raises:
        TunesmithError: the checkpoint is unreadable or incomplete.
    """
    folder = Path(folder)
    try:
        info = read_checkpoint_info(folder)
        # weights_only=False: the RNG states hold numpy/python objects; the file is our own.
        state = torch.load(folder / TRAINING_STATE, map_location="cpu", weights_only=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise TunesmithError(f"cannot read checkpoint {folder}: {exc}",
                             "delete that checkpoint folder to resume from the one before, or train again") from exc
    method.load_weights(model, folder)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return Progress(step=info["step"], epoch=info["epoch"], group_in_epoch=info["group_in_epoch"],
                    data_order=list(state["data_order"]), trained_tokens=info["trained_tokens"],
                    elapsed_s=info["elapsed_s"])
