"""Training methods, through a registry: adding a method is adding one file here.

A method decides which weights train and how they are saved. Each module in
this package calls :func:`register` with an object that follows :class:`Method`;
the package imports every module on first use, so no list needs editing.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from tunesmith.train.config import TrainConfig


class Method(Protocol):
    """What the recipe needs from a training method.

    Attributes:
        name: the ``--method`` value.
        is_adapter: True when the result is an adapter applied to a base model.
        base_learning_rate: the learning rate "auto" starts from, for a ~100M model.
    """

    name: str
    is_adapter: bool
    base_learning_rate: float

    def load_dtype(self, device: torch.device, precision: str) -> torch.dtype:
        """The dtype the base weights are loaded in on ``device`` for a run in ``precision`` (fp32 or bf16)."""

    def settings(self, config: "TrainConfig", continue_adapter: Path | None) -> dict:
        """The method's resolved settings (recorded in the manifest).

        Raises:
            ConfigError: the settings conflict with the adapter being continued.
        """

    def prepare(self, model: torch.nn.Module, config: "TrainConfig", *,
                continue_adapter: Path | None) -> torch.nn.Module:
        """Make the model trainable the method's way; continue ``continue_adapter`` if given."""

    def save_weights(self, model: torch.nn.Module, folder: Path) -> None:
        """Write the trained weights as a standard artefact (adapter folder or model folder)."""

    def load_weights(self, model: torch.nn.Module, folder: Path) -> None:
        """Load weights written by :meth:`save_weights` into the prepared ``model`` (resume)."""


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry under ``method.name``."""
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method called ``name``.

    Raises:
        ConfigError: no such method (with the known names).
    """
    from tunesmith.errors import ConfigError

    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError([f"method: {name!r} is not one of {', '.join(sorted(METHODS))}"]) from None


def _import_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_import_all()
