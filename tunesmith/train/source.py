"""Where a run's weights start: a base model, or a finished run to fine-tune further.

``--model`` takes a base model (name, Hugging Face folder, ``.gguf``) or a
finished run. With a run:

- LoRA-family on a run of the same family continues that adapter (its rank and
  targets) with the new data; the base stays the run's base.
- full on a full run continues its weights.
- LoRA-family on a full run trains a new adapter on the full run's model.
- full on a LoRA-family run merges the adapter into its base, then trains every weight.
- a LoRA-family run of another kind (LoRA on a DoRA run, say) is refused: merge it
  first with ``tunesmith export RUN --merged DIR`` and train on DIR.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.models.registry import REGISTRY
from tunesmith.models.store import ModelInfo, read_info, resolve_model
from tunesmith.train.runs import Run, find_run_dir, resolve_run


@dataclass
class ModelSource:
    """The resolved starting point of a run.

    Attributes:
        base_ref: the base as a reference ``resolve_model`` accepts (recorded in the manifest).
        base_path: the folder loaded as the starting model.
        base_name: a short name for run names and display.
        tokenizer_path: where the tokenizer (and chat template) comes from.
        parent: the finished run being fine-tuned further, if any.
        continue_adapter: the adapter folder to keep training (LoRA on LoRA).
        merge_adapter: an adapter to merge into the base before training (full on LoRA).
        info: tunesmith's metadata for the base folder, when it has some.
    """

    base_ref: str
    base_path: Path
    base_name: str
    tokenizer_path: Path
    parent: Run | None = None
    continue_adapter: Path | None = None
    merge_adapter: Path | None = None
    info: ModelInfo | None = None

    def describe(self) -> str:
        """One line saying what training starts from."""
        if self.parent is None:
            return f"base model {self.base_name} ({self.base_path})"
        if self.continue_adapter is not None:
            return f"continuing the adapter of run {self.parent.name} on {self.base_name}"
        if self.merge_adapter is not None:
            return f"run {self.parent.name}'s adapter merged into {self.base_name}"
        return f"the weights of run {self.parent.name}"


def resolve_source(model_ref: str, method) -> ModelSource:
    """Resolve ``--model`` for ``method``.

    Raises:
        NotFoundError: unknown model or run.
        TunesmithError: an unfinished run, or a combination that cannot continue.
    """
    run_dir = None if model_ref in REGISTRY else find_run_dir(model_ref)
    if run_dir is None:
        prepared = resolve_model(model_ref)
        ref = model_ref if model_ref in REGISTRY else str(prepared.path.resolve())
        return ModelSource(base_ref=ref, base_path=prepared.path, base_name=prepared.name,
                           tokenizer_path=prepared.path, info=prepared.info)
    return _from_run(resolve_run(str(run_dir)), method)


def _from_run(run: Run, method) -> ModelSource:
    final = run.final_dir
    assert final is not None  # resolve_run only returns finished runs here
    if not run.is_adapter:
        # The full run's final/ folder is a complete model: continue it, or put an adapter on it.
        return ModelSource(base_ref=str(final), base_path=final, base_name=run.name, tokenizer_path=final,
                           parent=run, info=read_info(final))
    base = resolve_model(run.base_model)
    common = dict(base_ref=run.base_model, base_path=base.path, base_name=base.name, tokenizer_path=final,
                  parent=run, info=base.info)
    if not method.is_adapter:
        return ModelSource(**common, merge_adapter=final)
    if method.name != run.method:
        raise TunesmithError(
            f"run {run.name} holds a {run.method} adapter; method {method.name!r} cannot continue it",
            f"continue it with --method {run.method}, or merge it first (tunesmith export {run.name} "
            f"--merged DIR) and train a new {method.name} adapter with --model DIR",
        )
    return ModelSource(**common, continue_adapter=final)


@dataclass
class ReplayFile:
    """A training file of an earlier run in the chain, and whether it is still as it was."""

    run: str
    path: Path
    problem: str | None = None


def ancestor_training_files(run: Run) -> list[ReplayFile]:
    """The training files of ``run`` and of the runs it continued, newest first.

    A file that is gone or changed since (its SHA-256 differs) carries a ``problem``.
    """
    from tunesmith.train.batches import file_fingerprint
    from tunesmith.train.runs import read_manifest

    files: list[ReplayFile] = []
    manifest, name, seen = run.manifest, run.name, set()
    while manifest is not None and name not in seen:
        seen.add(name)
        data = manifest.get("data") or {}
        if data.get("training_file"):
            path = Path(data["training_file"])
            problem = None
            if not path.is_file():
                problem = f"run {name}'s training file {path} is gone"
            elif data.get("training_sha256") and file_fingerprint(path) != data["training_sha256"]:
                problem = f"run {name}'s training file {path} changed since it trained"
            files.append(ReplayFile(name, path, problem))
        parent = manifest.get("parent_run")
        try:
            manifest = read_manifest(Path(parent["path"])) if parent else None
            name = parent["name"] if parent else name
        except TunesmithError:
            break
    return files
