"""Export a finished run as one standalone model folder.

A LoRA-family run's adapter is merged into its base (peft ``merge_and_unload``
with ``safe_merge``, which refuses a merge that produces NaN/Inf; every merged
tensor is checked again before anything is written). A full run's final model
is copied. The result is a transformers folder (safetensors, tokenizer, chat
template, generation config whose EOS ends a turn, ``tunesmith_model.json``),
written atomically, that any tool loading Hugging Face models can use and that
``--model`` accepts.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from tunesmith.atomic import atomic_dir, write_json
from tunesmith.errors import TunesmithError
from tunesmith.models.store import META_FILE, ModelInfo, resolve_model


def export_merged(run_ref: str, out: Path) -> Path:
    """Write the finished run ``run_ref`` as a merged full model folder at ``out``.

    Args:
        run_ref: a finished run (folder or name).
        out: the folder to create (must not exist, or be empty).

    Returns:
        ``out``.

    Raises:
        NotFoundError / TunesmithError: no such run, run unfinished, ``out`` taken,
            or the merge produced non-finite weights.
    """
    from tunesmith.train.runs import FINAL_INFO, resolve_run

    run = resolve_run(run_ref)
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TunesmithError(f"{out} already exists and is not empty", "choose another folder for --merged")
    final = run.final_dir
    assert final is not None
    with _disk_full_is_an_error(out):
        if not run.is_adapter:
            with atomic_dir(out) as tmp:
                for item in final.iterdir():
                    if item.name != FINAL_INFO:
                        shutil.copy2(item, tmp / item.name)
            return out
        merged = merge_adapter(run.base_model, final)
        _check_finite(merged, run.name)
        _save_merged(merged, final, out, name=out.name, source=f"run:{run.path} merged",
                     template_source=run.manifest.get("chat_template_source", "model"))
    return out


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is "no space left on device".

    safetensors reports it as its own error type with the OS message, not as an OSError.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(seen) or "os error 28" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def _disk_full_is_an_error(out: Path):
    try:
        yield
    except Exception as exc:
        if is_disk_full(exc):
            raise TunesmithError(f"the disk is full (writing {out}); nothing was written",
                                 "free some space or export to another disk") from exc
        raise


def merge_adapter(base_ref: str, adapter: Path):
    """Load ``base_ref`` in fp32 on the CPU and merge the PEFT adapter in ``adapter`` into it.

    Raises:
        TunesmithError: the merge produced NaN/Inf (peft's ``safe_merge`` check).
    """
    from peft import PeftModel

    from tunesmith.models.loading import load_causal_lm

    base = load_causal_lm(resolve_model(base_ref).path, device=torch.device("cpu"), dtype=torch.float32)
    try:
        with warnings.catch_warnings():
            # peft calls a helper that transformers 5 marks deprecated; not ours to fix
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload(safe_merge=True)
    except ValueError as exc:  # peft raises ValueError when a merged weight is not finite
        raise TunesmithError(f"merging the adapter in {adapter} gives broken weights: {exc}",
                             "the adapter holds NaN/Inf values; train it again with a lower learning rate"
                             ) from exc


def _check_finite(model, name: str) -> None:
    bad = [key for key, tensor in model.state_dict().items() if tensor.is_floating_point()
           and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise TunesmithError(f"the merged weights of run {name} contain NaN/Inf ({', '.join(bad[:3])})",
                             "nothing was written; train the adapter again with a lower learning rate")


def _save_merged(model, final: Path, out: Path, *, name: str, source: str, template_source: str) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    from tunesmith.models.loading import apply_chat_template_and_eos

    tokenizer = AutoTokenizer.from_pretrained(final)
    generation = GenerationConfig.from_pretrained(final)
    _source, end_of_turn, eos_ids = apply_chat_template_and_eos(tokenizer, generation)
    model.generation_config = generation
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        info = ModelInfo(name=name, source=source,
                         architecture=(model.config.architectures or [type(model).__name__])[0],
                         parameters=sum(p.numel() for p in model.parameters()),
                         chat_template_source=template_source, end_of_turn=end_of_turn, eos_token_ids=eos_ids)
        write_json(tmp / META_FILE, asdict(info))
