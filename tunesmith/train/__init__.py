"""The training layer: one recipe (:func:`tunesmith.train.recipe.train`), its typed config
(:class:`tunesmith.train.config.TrainConfig`), a methods registry, checkpoints and run folders.

Import from the submodules; the names below are re-exported lazily so that
``import tunesmith.train`` stays cheap.
"""

_EXPORTS = {
    "TrainConfig": "tunesmith.train.config",
    "train": "tunesmith.train.recipe",
    "TrainEvent": "tunesmith.train.recipe",
    "RunResult": "tunesmith.train.recipe",
    "Run": "tunesmith.train.runs",
    "resolve_run": "tunesmith.train.runs",
    "list_runs": "tunesmith.train.runs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
