"""Resolve a model reference to a prepared local transformers folder.

A reference is a registered name (``smollm2-135m``), a Hugging Face model folder,
or a ``.gguf`` file. Named models and GGUF files are converted once into
``TUNESMITH_HOME/models/<key>/`` (safetensors + tokenizer + chat template +
generation config whose EOS is the end-of-turn token), written atomically: a
folder is only used once its ``tunesmith_model.json`` exists, which is written
last, inside the temporary folder, before the rename.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from tunesmith import settings
from tunesmith.atomic import atomic_dir
from tunesmith.errors import NotFoundError, TunesmithError
from tunesmith.models.registry import REGISTRY, BaseModelSpec, get_spec

META_FILE = "tunesmith_model.json"

Progress = Callable[[str], None]


@dataclass
class ModelInfo:
    """What tunesmith knows about a prepared model folder (``tunesmith_model.json``)."""

    name: str
    source: str
    architecture: str
    parameters: int
    chat_template_source: str
    end_of_turn: str
    eos_token_ids: list[int]


@dataclass
class PreparedModel:
    """A model reference resolved to a local folder that transformers can load."""

    name: str
    path: Path
    info: ModelInfo | None


def cache_path(name: str) -> Path:
    """Where the registered model ``name`` is (or will be) cached."""
    return settings.models_dir() / name


def is_cached(path: Path) -> bool:
    """A cached model folder is complete only once its metadata file exists."""
    return (path / META_FILE).is_file()


def read_info(path: Path) -> ModelInfo | None:
    """The metadata of a prepared folder, or None for a plain Hugging Face folder."""
    meta = path / META_FILE
    if not meta.is_file():
        return None
    return ModelInfo(**json.loads(meta.read_text(encoding="utf-8")))


def resolve_model(ref: str, *, prepare: bool = True, progress: Progress | None = None) -> PreparedModel:
    """Resolve ``ref`` (name, HF folder or .gguf file) to a local folder.

    Args:
        ref: a registered name, a Hugging Face model folder, or a ``.gguf`` file path.
        prepare: convert a named model or GGUF file now if it is not cached yet.
        progress: called with a short message at each conversion stage.

    Raises:
        NotFoundError: unknown name, missing path, or a folder that is not a model.
    """
    if ref in REGISTRY:
        path = cache_path(ref)
        if not is_cached(path):
            if not prepare:
                raise NotFoundError(f"model {ref!r} is not prepared yet",
                                    f"run: tunesmith models pull {ref}")
            prepare_named(REGISTRY[ref], progress=progress)
        return PreparedModel(ref, path, read_info(path))
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise NotFoundError(f"{path} is not a Hugging Face model folder (no config.json)",
                                "pass a folder written by save_pretrained, a .gguf file, or a model name "
                                f"({', '.join(sorted(REGISTRY))})", param="model")
        return PreparedModel(path.name, path, read_info(path))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise NotFoundError(f"GGUF file {path} does not exist", "check the path", param="model")
        target = settings.models_dir() / _gguf_cache_key(path)
        if not is_cached(target):
            if not prepare:
                raise NotFoundError(f"GGUF file {path} is not converted yet", f"run: tunesmith models pull {path}")
            convert_gguf(path, target, name=path.stem, source=str(path.resolve()), progress=progress)
        return PreparedModel(path.stem, target, read_info(target))
    get_spec(ref)  # raises the "unknown model" error with the list of names
    raise AssertionError("unreachable")


def _gguf_cache_key(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"gguf-{path.stem}-{digest}"


def prepare_named(spec: BaseModelSpec, progress: Progress | None = None) -> Path:
    """Convert the registered model ``spec`` into the cache (once)."""
    target = cache_path(spec.name)
    if is_cached(target):
        return target
    with tempfile.TemporaryDirectory(prefix="tunesmith-gguf-", dir=settings.models_dir()) as scratch:
        _say(progress, f"locating {spec.package}")
        gguf = spec.locate_gguf(Path(scratch))
        convert_gguf(gguf, target, name=spec.name, source=f"pypi:{spec.package}", progress=progress)
    return target


def convert_gguf(gguf: Path, target: Path, *, name: str, source: str, progress: Progress | None = None) -> Path:
    """Dequantize a GGUF file into a safetensors model folder at ``target``, atomically.

    transformers refuses ``save_pretrained`` on a model loaded from GGUF, so the
    weights are loaded into a clean model built from the config without its
    ``quantization_config``; the logits are identical.
    """
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF reader's own bar; we show ours
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from tunesmith.models.loading import apply_chat_template_and_eos

    hf_logging.disable_progress_bar()
    try:
        _say(progress, "reading tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _say(progress, "dequantizing weights")
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise TunesmithError(f"cannot read GGUF file {gguf}: {exc}",
                             "check that it is a complete GGUF model file that transformers supports") from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    clean.tie_weights()
    del loaded
    _say(progress, "writing safetensors")
    with atomic_dir(target) as tmp:
        template_source, end_of_turn, eos_ids = apply_chat_template_and_eos(tokenizer, clean.generation_config)
        clean.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = ModelInfo(
            name=name,
            source=source,
            architecture=(config.architectures or [type(clean).__name__])[0],
            parameters=sum(p.numel() for p in clean.parameters()),
            chat_template_source=template_source,
            end_of_turn=end_of_turn,
            eos_token_ids=eos_ids,
        )
        (tmp / META_FILE).write_text(json.dumps(asdict(info), indent=2) + "\n", encoding="utf-8")
    _say(progress, "done")
    return target


def remove_cached(name: str) -> bool:
    """Delete a cached model folder; returns whether there was one."""
    path = cache_path(name)
    if path.exists():
        shutil.rmtree(path)
        return True
    return False


def _say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)
