"""The one typed training config that the CLI, the HTTP API and the worker build.

:class:`TrainConfig` holds what the user asked for, "auto" included; the recipe
resolves "auto" into numbers (:mod:`tunesmith.train.hyperparams`) and records
both. :meth:`TrainConfig.validate` reports every bad setting at once, before
anything heavy is loaded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from tunesmith.errors import ConfigError

AUTO = "auto"
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = (AUTO, "fp32", "bf16")
# Settings that must not change between a run and its resume: they shape the data
# order, the model or the optimisation, so a different value would not continue the run.
RESUME_LOCKED = (
    "model", "data", "validation", "method", "epochs", "batch_size", "learning_rate_multiplier",
    "lora_r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "max_length", "seed",
    "drop_system", "validation_split", "replay", "gradient_accumulation_steps", "warmup_ratio", "schedule",
    "max_grad_norm",
)


@dataclass
class TrainConfig:
    """A fine-tuning job, as the user asked for it.

    Attributes:
        model: base model (registered name, Hugging Face folder, ``.gguf``) or a
            finished run (its folder or its name) to continue fine-tuning.
        data: training file (any format the data layer reads).
        validation: optional validation file.
        method: a registered method (``lora``, ``dora``, ``full``).
        epochs, batch_size, learning_rate_multiplier: a number or ``"auto"``.
        lora_r, lora_alpha, lora_dropout, target_modules, use_rslora: LoRA-family settings.
        max_length: tokens per example; longer examples are truncated.
        seed: seeds weights init, data order and dropout; a CPU run is reproducible.
        out: run folder (default ``./runs/<name>``).
        suffix: a short name for the run and the fine-tuned model.
        drop_system: train without the system prompt (the model learns to answer the bare input).
        save_every_steps: also checkpoint every N optimizer steps (one per epoch always).
        validation_split: hold out this fraction of the training data when no validation file.
        replay: when ``model`` is a finished run, mix in earlier training examples of its runs,
            this many per new example (so the model keeps what it learned); "auto" = 1 when
            those files are still there, 0 otherwise; 0 = train on the new data alone.
        eval_every_steps: validation interval; None = about five evaluations per run.
        gradient_accumulation_steps, warmup_ratio, schedule, max_grad_norm: the optimisation.
        device: ``cuda``, ``cuda:1``, ``cpu``...; None = CUDA when present.
        precision: ``fp32``, ``bf16`` (autocast: matmuls in bf16, weights, optimizer and loss in
            fp32) or ``auto`` = bf16 where the hardware multiplies bf16 natively (a CUDA GPU with
            bf16, a CPU with AMX or AVX512-BF16), fp32 elsewhere.
    """

    model: str
    data: str
    validation: str | None = None
    method: str = "lora"
    epochs: int | str = AUTO
    batch_size: int | str = AUTO
    learning_rate_multiplier: float | str = AUTO
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    use_rslora: bool = False
    max_length: int = 1024
    seed: int = 42
    out: str | None = None
    suffix: str | None = None
    drop_system: bool = False
    save_every_steps: int | None = None
    validation_split: float = 0.0
    replay: float | str = AUTO
    eval_every_steps: int | None = None
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.05
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    device: str | None = None
    precision: str = AUTO

    def validate(self) -> None:
        """Check every setting and the files they name; never loads a model.

        Raises:
            ConfigError: with one line per problem, all of them at once.
        """
        problems = self.problems()
        if problems:
            raise ConfigError(problems, "fix the settings above and run again")

    def problems(self) -> list[str]:
        """Every invalid setting, one message each (empty when the config is valid)."""
        from tunesmith.train.methods import METHODS

        problems: list[str] = []
        problems += _model_problems(self.model)
        problems += _file_problems("data", self.data, required=True)
        problems += _file_problems("validation", self.validation, required=False)
        if self.method not in METHODS:
            problems.append(f"method: {self.method!r} is not one of {', '.join(sorted(METHODS))}")
        problems += _auto_or_number("epochs", self.epochs, integer=True, minimum=1, maximum=1000)
        problems += _auto_or_number("batch_size", self.batch_size, integer=True, minimum=1, maximum=4096)
        problems += _auto_or_number("learning_rate_multiplier", self.learning_rate_multiplier,
                                    integer=False, minimum=0.0, maximum=1000.0, exclusive_min=True)
        problems += _number("lora_r", self.lora_r, integer=True, minimum=1, maximum=4096)
        problems += _number("lora_alpha", self.lora_alpha, integer=False, minimum=0, maximum=1e6, exclusive_min=True)
        problems += _number("lora_dropout", self.lora_dropout, integer=False, minimum=0.0, maximum=0.99)
        problems += _target_modules_problems(self.target_modules)
        if not isinstance(self.use_rslora, bool):
            problems.append(f"use_rslora: must be true or false, not {self.use_rslora!r}")
        if self.use_rslora and self.method == "full":
            problems.append("use_rslora: applies to LoRA-family methods, not to method 'full'")
        problems += _number("max_length", self.max_length, integer=True, minimum=16, maximum=1_048_576)
        problems += _number("seed", self.seed, integer=True, minimum=0, maximum=2**32 - 1)
        if self.suffix is not None and not _is_valid_suffix(self.suffix):
            problems.append(f"suffix: {self.suffix!r} must be 1-64 characters of letters, digits, '-' or '_'")
        if self.save_every_steps is not None:
            problems += _number("save_every_steps", self.save_every_steps, integer=True, minimum=1, maximum=10**9)
        if self.eval_every_steps is not None:
            problems += _number("eval_every_steps", self.eval_every_steps, integer=True, minimum=1, maximum=10**9)
        problems += _number("validation_split", self.validation_split, integer=False, minimum=0.0, maximum=0.5)
        if self.validation and _is_number(self.validation_split) and self.validation_split > 0:
            problems.append("validation_split: give either a validation file or a held-out split, not both")
        problems += _auto_or_number("replay", self.replay, integer=False, minimum=0.0, maximum=10.0)
        problems += _replay_problems(self.model, self.replay)
        problems += _number("gradient_accumulation_steps", self.gradient_accumulation_steps, integer=True,
                            minimum=1, maximum=4096)
        problems += _number("warmup_ratio", self.warmup_ratio, integer=False, minimum=0.0, maximum=0.9)
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule: {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        problems += _number("max_grad_norm", self.max_grad_norm, integer=False, minimum=0.0, maximum=1e6,
                            exclusive_min=True)
        problems += _device_problems(self.device)
        if self.precision not in PRECISIONS:
            problems.append(f"precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        return problems

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (for the run manifest and checkpoints)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Rebuild a config saved by :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError([f"{key}: unknown setting" for key in unknown])
        return cls(**data)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(name: str, value: Any, *, integer: bool, minimum: float, maximum: float,
            exclusive_min: bool = False) -> list[str]:
    kind = "a whole number" if integer else "a number"
    if not _is_number(value) or (integer and not isinstance(value, int)):
        return [f"{name}: must be {kind}, not {value!r}"]
    low_ok = value > minimum if exclusive_min else value >= minimum
    if not low_ok or value > maximum:
        bound = f"greater than {minimum:g}" if exclusive_min else f"at least {minimum:g}"
        return [f"{name}: {value!r} is out of range (must be {bound} and at most {maximum:g})"]
    return []


def _auto_or_number(name: str, value: Any, **kwargs) -> list[str]:
    if value == AUTO:
        return []
    problems = _number(name, value, **kwargs)
    if problems and not _is_number(value):
        return [problems[0].replace(", not", " or 'auto', not")]
    return problems


def _file_problems(name: str, value: Any, *, required: bool) -> list[str]:
    if value is None or value == "":
        return [f"{name}: required (a JSONL file)"] if required else []
    path = Path(str(value)).expanduser()
    if not path.exists():
        return [f"{name}: file {path} does not exist"]
    if not path.is_file():
        return [f"{name}: {path} is not a file"]
    return []


def _target_modules_problems(value: Any) -> list[str]:
    if isinstance(value, str):
        return [] if value.strip() else ["target_modules: must be 'all-linear' or a list of module names"]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v.strip() for v in value):
        return []
    return [f"target_modules: must be 'all-linear' or a non-empty list of module names, not {value!r}"]


def _is_valid_suffix(value: Any) -> bool:
    return (isinstance(value, str) and 0 < len(value) <= 64
            and all(c.isalnum() or c in "-_" for c in value))


def _device_problems(value: Any) -> list[str]:
    if value is None:
        return []
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        return [f"device: {value!r} is not a device (use cpu, cuda or cuda:N)"]
    if device.type == "cuda" and not torch.cuda.is_available():
        return [f"device: {value!r} asked for, but no CUDA GPU is available"]
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        return [f"device: {value!r} does not exist ({torch.cuda.device_count()} GPU(s) present)"]
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        return [f"device: {value!r} is not supported (use cpu or cuda)"]
    return []


def _model_problems(value: Any) -> list[str]:
    """Cheap checks of ``model``: a known name, an existing model folder or .gguf file, or a finished run."""
    from tunesmith.models.registry import REGISTRY
    from tunesmith.train.runs import SUCCEEDED, find_run_dir, read_manifest

    if not isinstance(value, str) or not value.strip():
        return ["model: required (a model name, a model folder, a .gguf file or a finished run)"]
    if value in REGISTRY:
        return []
    run_dir = find_run_dir(value)
    if run_dir is not None:
        try:
            status = read_manifest(run_dir).get("status")
        except Exception as exc:  # a damaged manifest: say so here, with the rest
            return [f"model: {value}: {exc}"]
        if status != SUCCEEDED:
            return [f"model: run {run_dir.name} never finished (status: {status}); resume it before "
                    "fine-tuning it further"]
        return []
    path = Path(value).expanduser()
    if path.is_dir():
        return [] if (path / "config.json").is_file() else [
            f"model: {path} is neither a model folder (no config.json) nor a tunesmith run (no manifest.json)"]
    if path.suffix == ".gguf":
        return [] if path.is_file() else [f"model: GGUF file {path} does not exist"]
    if path.exists():
        return [f"model: {path} is a file, not a model folder or a .gguf file"]
    known = ", ".join(sorted(REGISTRY))
    return [f"model: {value!r} is not a known model ({known}), a model folder, a .gguf file or a run name"]


def _replay_problems(model: Any, replay: Any) -> list[str]:
    """Replay needs earlier training data: only a finished run as ``model`` has some."""
    if replay == AUTO or not _is_number(replay) or replay == 0 or not isinstance(model, str):
        return []
    from tunesmith.models.registry import REGISTRY
    from tunesmith.train.runs import find_run_dir

    if model in REGISTRY or find_run_dir(model) is None:
        return ["replay: mixes in the earlier training data of a fine-tuned run; --model is not a run"]
    return []
