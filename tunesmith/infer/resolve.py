"""Turn a model reference into what the engine must load.

A reference is a base-model name (``smollm2-135m``), a Hugging Face model folder,
a ``.gguf`` file, a finished run (``./runs/X`` or its name), a run's ``final/``
folder, or a checkpoint folder that holds a PEFT adapter or full weights. The
answer says whether it is a base model, a full fine-tuned model or an adapter,
where its base is, and whether training dropped the system prompt.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tunesmith.errors import NotFoundError, TunesmithError

ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"

Kind = Literal["base", "full", "adapter"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model reference points.

    Attributes:
        ref: the reference as given.
        name: a short display name.
        kind: "base" (an untouched model), "full" (fully fine-tuned weights) or "adapter".
        path: the model folder, or the adapter folder for an adapter.
        base_path: the base model folder an adapter attaches to (None otherwise).
        drop_system: training dropped the system prompt (ask the model without one).
        run_path: the run the model came from, when it came from one.
    """

    ref: str
    name: str
    kind: Kind
    path: Path
    base_path: Path | None = None
    drop_system: bool = False
    run_path: Path | None = None

    @property
    def is_adapter(self) -> bool:
        """The model is a PEFT adapter on a shared base."""
        return self.kind == "adapter"


def locate(ref: str) -> ModelSource:
    """Resolve ``ref`` to a :class:`ModelSource` without loading any weights.

    Args:
        ref: base-model name, model folder, .gguf file, run folder or name, run final/ or checkpoint folder.

    Raises:
        NotFoundError: nothing of that name, a folder that holds no model, or a run that has not finished.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise NotFoundError("no model given", "name a base model, a run, or a model folder", param="model")
    path = Path(ref).expanduser()
    if path.is_dir():
        return _locate_folder(ref, path)
    from tunesmith.models.registry import REGISTRY

    if ref in REGISTRY or path.suffix == ".gguf":
        return _base(ref)
    run = _find_run(ref)
    if run is not None:
        return _locate_run(ref, run)
    if os.sep in ref or ref.startswith("."):
        raise NotFoundError(f"{ref} does not exist", "pass an existing run or model folder, or a base-model name",
                            param="model")
    return _base(ref)  # raises the registry's "unknown model" error with the known names


def _base(ref: str) -> ModelSource:
    from tunesmith.models.store import resolve_model

    prepared = resolve_model(ref)
    return ModelSource(ref=ref, name=prepared.name, kind="base", path=Path(prepared.path))


def _locate_folder(ref: str, path: Path) -> ModelSource:
    """A folder: an adapter, a model, or a run (whose final/ holds the model)."""
    if (path / ADAPTER_CONFIG).is_file():
        run = _owning_run(path)
        return ModelSource(ref=ref, name=_display_name(path, run), kind="adapter", path=path,
                           base_path=_adapter_base(path, run), drop_system=_drop_system(run),
                           run_path=_run_path(run))
    if (path / MODEL_CONFIG).is_file():
        run = _owning_run(path)
        kind: Kind = "full" if run is not None else "base"
        return ModelSource(ref=ref, name=_display_name(path, run), kind=kind, path=path,
                           drop_system=_drop_system(run), run_path=_run_path(run))
    run = _find_run(str(path))
    if run is not None:
        return _locate_run(ref, run)
    raise NotFoundError(f"{path} holds no model: no {ADAPTER_CONFIG}, no {MODEL_CONFIG}, and it is not a run",
                        "pass a finished run, its final/ folder, a checkpoint folder, or a base-model name",
                        param="model")


def _locate_run(ref: str, run) -> ModelSource:
    if not run.finished or run.final_dir is None or not Path(run.final_dir).is_dir():
        raise NotFoundError(f"run {run.path} has not finished, so it has no final model",
                            "resume it with `tunesmith train --resume`, or pass one of its checkpoint folders",
                            param="model")
    final = Path(run.final_dir)
    source = _locate_folder(ref, final)
    return ModelSource(ref=ref, name=Path(run.path).name, kind=source.kind, path=source.path,
                       base_path=source.base_path, drop_system=_drop_system(run), run_path=Path(run.path))


def _find_run(ref: str):
    """The run ``ref`` names (its folder, final/ folder or name), finished or not; None when none."""
    try:
        from tunesmith.train.runs import Run, find_run_dir, read_manifest
    except ImportError:  # a build without the training layer: only models and folders resolve
        return None
    found = find_run_dir(ref)
    return Run(found.resolve(), read_manifest(found)) if found is not None else None


def _owning_run(folder: Path):
    """The run a final/ or checkpoint folder (``checkpoints/step-N/[model]``) belongs to, if any."""
    for candidate in (folder.parent, folder.parent.parent, folder.parent.parent.parent):
        if candidate == folder or not candidate.is_dir():
            continue
        run = _find_run(str(candidate))
        if run is not None:
            return run
    return None


def _adapter_base(adapter: Path, run) -> Path:
    """The base model folder of an adapter: the run's base, else the adapter config's."""
    base_ref = getattr(run, "base_model", None) if run is not None else None
    if not base_ref:
        config = json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        base_ref = config.get("base_model_name_or_path")
    if not base_ref:
        raise TunesmithError(f"the adapter in {adapter} does not say which base model it belongs to",
                             f"set base_model_name_or_path in its {ADAPTER_CONFIG}")
    base = locate(str(base_ref))
    if base.is_adapter:  # LoRA on LoRA continues one adapter, so its base is the first base
        return base.base_path
    return base.path


def _drop_system(run) -> bool:
    """Whether the run's training dropped the system prompt (recorded in its manifest)."""
    return bool(run.drop_system) if run is not None else False


def _run_path(run) -> Path | None:
    return Path(run.path) if run is not None else None


def _display_name(path: Path, run) -> str:
    if run is None:
        return path.name
    run_name = Path(run.path).name
    return run_name if Path(run.final_dir or "") == path else f"{run_name}/{path.name}"
