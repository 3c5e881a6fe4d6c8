"""The training recipe: resolve config → load tokenizer and data → load model →
resolve hyperparameters → loop → checkpoint → final save.

:func:`train` is the one entry point the CLI, the HTTP worker and the demo call.
It reports through ``on_event`` (never prints) and stops cleanly when
``should_stop`` asks or on SIGINT/SIGTERM: it writes a checkpoint and returns
an "interrupted" result that ``resume=True`` continues exactly.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from tunesmith import settings
from tunesmith.atomic import atomic_dir, write_json
from tunesmith.errors import ConfigError, DataError, NotFoundError, TunesmithError
from tunesmith.models.export import is_disk_full
from tunesmith.models.attention import attention_kernels
from tunesmith.models.loading import (apply_chat_template_and_eos, load_causal_lm, load_tokenizer, native_precision,
                                      pick_device)
from tunesmith.train import batches as data
from tunesmith.train import checkpoint as ckpt
from tunesmith.train import fast
from tunesmith.train import heap
from tunesmith.train import hyperparams
from tunesmith.train.config import AUTO, RESUME_LOCKED, TrainConfig
from tunesmith.train.methods import get_method
from tunesmith.train.metrics import MetricsLog
from tunesmith.train.runs import (
    CHECKPOINTS, FAILED, FINAL, FINAL_INFO, INTERRUPTED, LOSS_PNG, MANIFEST_FORMAT, METRICS_CSV, RUNNING,
    SUCCEEDED, is_run_dir, list_runs, read_manifest, resumable_run_dir, utc_now, write_manifest,
)
from tunesmith.train.source import ModelSource, ancestor_training_files, resolve_source

EVALUATIONS_PER_RUN = 5
# Resolved values that fix the sequence of steps: a resumed run keeps the ones it started with.
RESOLVED_LOCKED = ("n_epochs", "batch_size", "learning_rate_multiplier", "learning_rate", "steps_per_epoch",
                   "total_steps", "warmup_steps", "eval_every_steps", "precision")
WEIGHT_DECAY = 0.0  # small data, few steps: decay only fights the fit; adapters start at zero anyway


@dataclass
class TrainEvent:
    """Something the caller may show or store.

    Attributes:
        kind: "message", "metrics" (one per optimizer step) or "checkpoint".
        message: a line for people.
        data: metrics: step, total_steps, epoch, train_loss, train_accuracy, valid_loss,
            valid_mean_token_accuracy, tokens, elapsed, learning_rate, tokens_per_second;
            checkpoint: step, path, metrics.
    """

    kind: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    """How a call to :func:`train` ended.

    Attributes:
        status: "succeeded" or "interrupted" (resumable with ``resume=True``).
        run_dir: the run folder; final_dir: its final/ model (None unless succeeded).
        trained_tokens: tokens trained on (padding excluded, every epoch counted).
        steps: optimizer steps done; metrics: latest train/validation loss and accuracy.
        resolved: the resolved hyperparameters; reason: why an interrupted run stopped.
    """

    status: str
    run_dir: Path
    final_dir: Path | None
    trained_tokens: int
    steps: int
    metrics: dict[str, Any]
    resolved: dict[str, Any]
    reason: str | None = None


EventSink = Callable[[TrainEvent], None]


def train(config: TrainConfig, *, resume: bool = False, on_event: EventSink | None = None,
          should_stop: Callable[[], str | None] | None = None) -> RunResult:
    """Fine-tune ``config.model`` on ``config.data`` and save the result as a standard artefact.

    Args:
        config: the job; validated here before anything is loaded.
        resume: continue the run in ``config.out`` (or the newest matching unfinished run
            under ./runs) from its last complete checkpoint.
        on_event: receives messages, per-step metrics and checkpoints.
        should_stop: polled after every optimizer step; a returned reason ("pause",
            "cancel", ...) checkpoints and returns an "interrupted" result.

    Returns:
        The run's result.

    Raises:
        ConfigError, DataError, NotFoundError, TunesmithError: bad input, with what to do.
    """
    emit = on_event or (lambda event: None)
    # 1. Settings: every problem at once, before any loading.
    config.validate()
    method = get_method(config.method)
    run_dir = _find_resume_dir(config) if resume else _new_run_dir(config)
    config = _with_out(config, run_dir)
    if resume:
        _check_resume_compatible(config, read_manifest(run_dir))
    session = _Session(config=config, method=method, run_dir=run_dir, emit=emit, should_stop=should_stop)
    try:
        with _stop_on_signals() as signalled:
            session.signalled = signalled
            return session.run(resume)
    except KeyboardInterrupt:
        session.mark(INTERRUPTED)
        raise
    except BaseException as exc:
        session.mark_failed(exc)
        if is_disk_full(exc):
            raise TunesmithError(f"the disk is full (writing {getattr(exc, 'filename', None) or run_dir})",
                                 f"free some space, then resume: tunesmith train --out {run_dir} --resume"
                                 ) from exc
        raise


class _Session:
    """One call of :func:`train`: the recipe's state, walked through top to bottom in :meth:`run`."""

    def __init__(self, *, config: TrainConfig, method, run_dir: Path, emit: EventSink,
                 should_stop: Callable[[], str | None] | None):
        self.config, self.method, self.run_dir, self.emit = config, method, run_dir, emit
        self.should_stop = should_stop
        self.signalled: dict[str, str | None] = {"reason": None}
        self.manifest: dict[str, Any] | None = None

    # ---------------------------------------------------------------- the recipe
    def run(self, resume: bool) -> RunResult:
        config, method = self.config, self.method
        started = time.perf_counter()
        # 2. Where the weights start: a base model or a finished run.
        source = resolve_source(config.model, method)
        self.say(f"starting from {source.describe()}")
        # 3. Tokenizer (with its chat template) and data: masks come from the data layer.
        tokenizer = load_tokenizer(source.tokenizer_path)
        replay, replay_files = self.resolve_replay(source)
        training = data.build_data(config, tokenizer, replay=replay, replay_files=replay_files)
        for note in training.notes:
            self.say(note)
        # 4. Model, made trainable the method's way; the seed fixes adapter init and dropout.
        device = pick_device(config.device)
        _seed_everything(config.seed)
        model = _load_model(source, method, device, self.run_precision(resume, device))
        model = method.prepare(model, config, continue_adapter=source.continue_adapter)
        # 5. "auto" → numbers, printed and saved.
        resolved = resolve_hyperparameters(config, method, model, training, device, source,
                                           pad_token_id=tokenizer.pad_token_id)
        if resume and is_run_dir(self.run_dir):
            resolved = self.keep_run_schedule(resolved)
        self.say("resolved hyperparameters: " + ", ".join(f"{k}={v}" for k, v in _shown(resolved).items()),
                 {"resolved": resolved})
        # 6. Optimizer and schedule over the trainable weights only.
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = _optimizer(trainable, resolved["learning_rate"])
        scheduler = _scheduler(optimizer, config.schedule, resolved["warmup_steps"], resolved["total_steps"])
        # 7. The run folder: a fresh manifest, or the last complete checkpoint restored.
        progress, metrics = self.open_run(resume, source, resolved, training, model, optimizer, scheduler,
                                          tokenizer)
        load_seconds = time.perf_counter() - started
        # 8. The loop.
        # the output layer's rows x vocab temporaries, and the C heap's freed pages, kept across steps
        with fast.reused_loss_buffers(), heap.kept_heap():
            stopped = self.fit(model, optimizer, scheduler, training, resolved, progress, metrics, device,
                               trainable)
        if stopped is not None:
            return self.interrupted(stopped, progress, metrics, resolved)
        # 9. The final model, then the manifest that says it is one.
        final = self.save_final(model, tokenizer, source, resolved)
        return self.succeeded(final, progress, metrics, resolved, load_seconds)

    def resolve_replay(self, source: ModelSource) -> tuple[float, list[Path]]:
        """How much earlier training data to mix in when continuing a run, and from which files.

        Raises:
            DataError: replay was asked for explicitly, but an earlier file is gone or changed.
        """
        if source.parent is None:
            return 0.0, []
        files = ancestor_training_files(source.parent)
        usable = [f.path for f in files if f.problem is None]
        problems = [f.problem for f in files if f.problem is not None]
        if self.config.replay != AUTO:
            if self.config.replay > 0 and problems:
                raise DataError("cannot replay the earlier training data", problems,
                                hint="restore the files, or pass --replay 0 to train on the new data alone")
            return float(self.config.replay), usable
        for problem in problems:
            self.say(f"not replayed: {problem}")
        return (1.0 if usable else 0.0), usable

    def saved_resolved(self) -> dict:
        """The resolved values the run folder's manifest keeps (the run is resumed)."""
        return read_manifest(self.run_dir).get("resolved") or {}

    def run_precision(self, resume: bool, device: torch.device) -> str:
        """The precision this run trains in: the run's own when it resumes (it is kept), else resolved now."""
        if resume and is_run_dir(self.run_dir):
            saved = self.saved_resolved().get("precision")
            if saved is not None:
                return saved
        return resolve_precision(self.config.precision, device)

    def keep_run_schedule(self, resolved: dict) -> dict:
        """On resume, the values that shape the run's steps come from the run, not from "auto" now
        (free memory, say, may have changed the automatic batch size since)."""
        saved = self.saved_resolved()
        kept = dict(resolved)
        for key in RESOLVED_LOCKED:
            if key in saved and saved[key] != resolved.get(key):
                self.say(f"{key} {saved[key]} kept from the run (now it would be {resolved.get(key)})")
                kept[key] = saved[key]
        return kept

    # ---------------------------------------------------------------- the loop
    def fit(self, model, optimizer, scheduler, training: data.TrainingData, resolved: dict,
            progress: ckpt.Progress, metrics: MetricsLog, device: torch.device, trainable) -> str | None:
        """Train until the last epoch ends (returns None) or a stop is asked (returns the reason)."""
        config = self.config
        autocast = autocast_for(resolved["precision"], device)
        session_start, session_tokens = time.perf_counter(), 0
        elapsed_before = progress.elapsed_s
        for epoch in range(progress.epoch, resolved["n_epochs"]):
            order = progress.data_order if progress.data_order else data.epoch_order(
                len(training.train), config.seed, epoch)
            if sorted(order) != list(range(len(training.train))):
                raise TunesmithError("the checkpoint's data order does not match the training data",
                                     "the training file changed since the run started; start a new run")
            progress.epoch, progress.data_order = epoch, order
            batches = fast.pack_batches(training.train, order, resolved["batch_size"], fast.row_multiple(device))
            groups = data.group(batches, config.gradient_accumulation_steps)
            for index in range(progress.group_in_epoch, len(groups)):
                stats = train_step(model, groups[index], optimizer, scheduler, trainable,
                                   config.max_grad_norm, device, autocast)
                if not math.isfinite(stats["loss"]):
                    raise TunesmithError(f"the training loss became {stats['loss']} at step {progress.step + 1}",
                                         "lower --learning-rate-multiplier or check the data")
                progress.step += 1
                progress.group_in_epoch = index + 1
                progress.trained_tokens += stats["tokens"]
                session_tokens += stats["tokens"]
                progress.elapsed_s = elapsed_before + time.perf_counter() - session_start
                row = self.record_step(model, training, resolved, progress, metrics, stats, device, autocast,
                                       session_tokens / max(time.perf_counter() - session_start, 1e-9))
                epoch_done = index + 1 == len(groups)
                if epoch_done:
                    progress.epoch, progress.group_in_epoch, progress.data_order = epoch + 1, 0, []
                reason = self.stop_reason()
                save_every = config.save_every_steps
                if epoch_done or reason or (save_every and progress.step % save_every == 0):
                    self.checkpoint(model, optimizer, scheduler, progress, metrics, resolved, row)
                if reason:
                    return reason
            progress.group_in_epoch = 0
        return None

    def record_step(self, model, training, resolved, progress, metrics: MetricsLog, stats, device, autocast,
                    tokens_per_second: float) -> dict:
        """Validate when due, append the metrics row and emit it."""
        row = {"step": progress.step, "train_loss": stats["loss"], "train_accuracy": stats["accuracy"],
               "valid_loss": None, "valid_mean_token_accuracy": None, "tokens": progress.trained_tokens,
               "elapsed_s": round(progress.elapsed_s, 3)}
        if training.valid and (progress.step % resolved["eval_every_steps"] == 0
                               or progress.step == resolved["total_steps"]):
            valid = evaluate(model, training.valid, resolved["batch_size"], device,
                             autocast)
            row["valid_loss"], row["valid_mean_token_accuracy"] = valid["loss"], valid["accuracy"]
        metrics.append(row)
        self.emit(TrainEvent("metrics", _metrics_line(row, resolved), {
            **row, "elapsed": row["elapsed_s"], "total_steps": resolved["total_steps"],
            "epoch": progress.epoch + 1, "n_epochs": resolved["n_epochs"],
            "learning_rate": stats["learning_rate"], "tokens_per_second": tokens_per_second}))
        return row

    def stop_reason(self) -> str | None:
        """A reason to stop now: a signal, or the caller's ``should_stop``."""
        if self.signalled["reason"]:
            return self.signalled["reason"]
        return self.should_stop() if self.should_stop is not None else None

    # ---------------------------------------------------------------- run folder
    def open_run(self, resume: bool, source: ModelSource, resolved: dict, training: data.TrainingData,
                 model, optimizer, scheduler, tokenizer) -> tuple[ckpt.Progress, MetricsLog]:
        """Start the manifest, or restore the newest complete checkpoint when resuming."""
        metrics_path = self.run_dir / METRICS_CSV
        if resume and is_run_dir(self.run_dir):
            self.manifest = read_manifest(self.run_dir)
            self.manifest.update(status=RUNNING, resolved=resolved, error=None)
            latest = ckpt.latest_resumable(self.run_dir)
            if latest is not None:
                progress = ckpt.load_checkpoint(latest, method=self.method, model=model, optimizer=optimizer,
                                                scheduler=scheduler)
                self.say(f"resumed from {latest.relative_to(self.run_dir)}: step {progress.step} of "
                         f"{resolved['total_steps']}, epoch {min(progress.epoch + 1, resolved['n_epochs'])} of "
                         f"{resolved['n_epochs']}, {progress.trained_tokens} tokens trained",
                         {"checkpoint": str(latest), "step": progress.step})
                write_manifest(self.run_dir, self.manifest)
                return progress, MetricsLog.resume(metrics_path, progress.step)
            self.say("no complete checkpoint yet: the run starts over in the same folder")
            metrics_path.unlink(missing_ok=True)
        else:
            self.manifest = _new_manifest(self.config, self.method, source, resolved, training, tokenizer)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_manifest(self.run_dir, self.manifest)
        self.say(f"run folder: {self.run_dir}")
        return ckpt.Progress(), MetricsLog(metrics_path)

    def checkpoint(self, model, optimizer, scheduler, progress: ckpt.Progress, metrics: MetricsLog,
                   resolved: dict, row: dict) -> Path:
        """Write a checkpoint, refresh the plot and the manifest, and emit the event."""
        latest = _latest_metrics(metrics)
        path = ckpt.save_checkpoint(self.run_dir, method=self.method, model=model, optimizer=optimizer,
                                    scheduler=scheduler, progress=progress,
                                    info={"metrics": latest, "config": self.config.to_dict(),
                                          "resolved": resolved, "saved_at": utc_now()})
        metrics.plot(self.run_dir / LOSS_PNG)
        self.update_manifest(progress, latest, resolved, last_checkpoint=str(path.relative_to(self.run_dir)))
        self.emit(TrainEvent("checkpoint", f"checkpoint {path.name} saved",
                             {"step": progress.step, "path": str(path), "metrics": latest}))
        return path

    def save_final(self, model, tokenizer, source: ModelSource, resolved: dict) -> Path:
        """Write final/: the weights (adapter or model), tokenizer, chat template, generation config."""
        target = self.run_dir / FINAL
        base = model.get_base_model() if self.method.is_adapter else model
        generation = _copy_generation_config(base)
        template_source, end_of_turn, eos_ids = apply_chat_template_and_eos(tokenizer, generation)
        template_source = self.manifest.get("chat_template_source", template_source)
        with atomic_dir(target) as tmp:
            if not self.method.is_adapter:
                base.generation_config = generation
            self.method.save_weights(model, tmp)
            tokenizer.save_pretrained(tmp)
            generation.save_pretrained(tmp)
            if not self.method.is_adapter:
                _write_model_info(tmp, self.manifest["name"], self.run_dir, base, template_source,
                                  end_of_turn, eos_ids)
            write_json(tmp / FINAL_INFO, {
                "format": MANIFEST_FORMAT, "run": self.manifest["name"], "method": self.method.name,
                "is_adapter": self.method.is_adapter, "base_model": self.manifest["base_model"],
                "chat_template_source": template_source, "end_of_turn": end_of_turn, "eos_token_ids": eos_ids,
                "drop_system": self.config.drop_system, "resolved": resolved,
            })
        return target

    def succeeded(self, final: Path, progress, metrics: MetricsLog, resolved, load_seconds) -> RunResult:
        metrics.rewrite()
        if metrics.rows:
            metrics.plot(self.run_dir / LOSS_PNG)
        latest = _latest_metrics(metrics)
        self.manifest["status"] = SUCCEEDED
        self.manifest["finished_at"] = utc_now()
        self.manifest["timings"]["load_seconds"] = round(load_seconds, 2)
        self.update_manifest(progress, latest, resolved)
        self.say(f"finished: {final}", {"final_dir": str(final)})
        return RunResult(SUCCEEDED, self.run_dir, final, progress.trained_tokens, progress.step, latest, resolved)

    def interrupted(self, reason: str, progress, metrics: MetricsLog, resolved) -> RunResult:
        metrics.rewrite()
        self.manifest["status"] = INTERRUPTED
        self.manifest["stop_reason"] = reason
        self.update_manifest(progress, _latest_metrics(metrics), resolved)
        self.say(f"stopped ({reason}) at step {progress.step}; resume with: "
                 f"tunesmith train --out {self.run_dir} --resume", {"reason": reason, "step": progress.step})
        return RunResult(INTERRUPTED, self.run_dir, None, progress.trained_tokens, progress.step,
                         _latest_metrics(metrics), resolved, reason)

    def update_manifest(self, progress: ckpt.Progress, latest: dict, resolved: dict, **extra) -> None:
        self.manifest.update(extra)
        self.manifest["progress"] = {"step": progress.step, "total_steps": resolved["total_steps"],
                                     "epoch": progress.epoch, "trained_tokens": progress.trained_tokens}
        self.manifest["trained_tokens"] = progress.trained_tokens
        self.manifest["metrics"] = latest
        self.manifest["timings"]["train_seconds"] = round(progress.elapsed_s, 2)
        write_manifest(self.run_dir, self.manifest)

    def mark(self, status: str, error: str | None = None) -> None:
        """Best effort: record ``status`` in the manifest when the run folder exists."""
        if self.manifest is None or not is_run_dir(self.run_dir):
            return
        with contextlib.suppress(Exception):
            self.manifest["status"] = status
            if error is not None:
                self.manifest["error"] = error
            write_manifest(self.run_dir, self.manifest)

    def mark_failed(self, exc: BaseException) -> None:
        self.mark(FAILED, str(exc) or type(exc).__name__)

    def say(self, message: str, payload: dict | None = None) -> None:
        self.emit(TrainEvent("message", message, payload or {}))


# -------------------------------------------------------------------- one step
# The training step packs each batch's examples into one row (attention never crosses an
# example) and runs the output layer only at labelled positions: no compute on padding or
# on the vocabulary projection of prompt tokens. Same gradient as the padded path
# (tests/train/test_fast.py); figures in bench/RESULTS.md.


def token_loss(model, batch) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over labelled tokens, and how many of them the model got right.

    A packed batch takes the fast path; a padded :class:`data.Batch` the plain one,
    where only positions with a label are projected through the loss.
    """
    with attention_kernels(batch.input_ids.device):  # a backward runs the kernels its forward chose
        if isinstance(batch, fast.PackedBatch):
            return fast.packed_token_loss(model, batch)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    labels = batch.labels[:, 1:]
    mask = labels != data.IGNORE_INDEX
    selected = logits[:, :-1][mask].float()
    target = labels[mask]
    loss = F.cross_entropy(selected, target, reduction="sum")
    correct = int((selected.argmax(dim=-1) == target).sum())
    return loss, correct


def train_step(model, group: list[data.Batch], optimizer, scheduler, trainable, max_grad_norm: float,
               device: torch.device, autocast) -> dict:
    """One optimizer step over an accumulation group.

    The loss is the mean over every labelled token of the group (not a mean of
    per-batch means), so accumulation gives the same gradient as one big batch.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    labelled = sum(b.labelled for b in group)
    loss_sum, correct, tokens = 0.0, 0, 0
    for batch in group:
        batch = batch.to(device)
        with autocast():
            loss, right = token_loss(model, batch)
        (loss / labelled).backward()
        loss_sum += float(loss.detach())
        correct += right
        tokens += batch.tokens
    torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    learning_rate = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    return {"loss": loss_sum / labelled, "accuracy": correct / labelled, "tokens": tokens,
            "learning_rate": learning_rate}


@torch.no_grad()
def evaluate(model, samples: list[data.Sample], batch_size: int, device: torch.device,
             autocast) -> dict:
    """Mean token loss and accuracy over labelled tokens of ``samples`` (dropout off)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, labelled = 0.0, 0, 0
    for batch in fast.pack_batches(samples, list(range(len(samples))), batch_size, fast.row_multiple(device)):
        batch = batch.to(device)
        with autocast():
            loss, right = token_loss(model, batch)
        loss_sum += float(loss)
        correct += right
        labelled += batch.labelled
    model.train(was_training)
    return {"loss": loss_sum / max(labelled, 1), "accuracy": correct / max(labelled, 1)}


# -------------------------------------------------------------------- setup helpers
def resolve_hyperparameters(config: TrainConfig, method, model, training: data.TrainingData,
                            device: torch.device, source: ModelSource, *, pad_token_id: int) -> dict[str, Any]:
    """Turn "auto" into numbers and collect everything the run depends on (saved in the manifest)."""
    shape = hyperparams.model_shape(model)
    n_train = len(training.train)
    epochs = hyperparams.resolve_epochs(config, n_train)
    batch_size = hyperparams.resolve_batch_size(config, n_train, shape, device)
    multiplier, learning_rate = hyperparams.resolve_learning_rate(config, method.base_learning_rate,
                                                                  method.is_adapter, shape)
    steps_per_epoch = math.ceil(math.ceil(n_train / batch_size) / config.gradient_accumulation_steps)
    total_steps = epochs * steps_per_epoch
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    resolved = {
        "n_epochs": epochs,
        "batch_size": batch_size,
        "learning_rate_multiplier": multiplier,
        "learning_rate": learning_rate,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "effective_batch_size": batch_size * config.gradient_accumulation_steps,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "warmup_steps": math.ceil(config.warmup_ratio * total_steps),
        "schedule": config.schedule,
        "max_grad_norm": config.max_grad_norm,
        "weight_decay": WEIGHT_DECAY,
        "eval_every_steps": config.eval_every_steps or max(1, math.ceil(total_steps / EVALUATIONS_PER_RUN)),
        "save_every_steps": config.save_every_steps,
        "max_length": config.max_length,
        "seed": config.seed,
        "method": method.name,
        **method.settings(config, source.continue_adapter),
        "trainable_parameters": trainable,
        "total_parameters": shape.parameters,
        "n_train_examples": n_train,
        "n_replay_examples": training.replayed,
        "n_valid_examples": len(training.valid),
        "device": str(device),
        "weights_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "precision": resolve_precision(config.precision, device),
        "pad_token_id": pad_token_id,
    }
    return resolved


def _load_model(source: ModelSource, method, device: torch.device, precision: str):
    model = load_causal_lm(source.base_path, device=device, dtype=method.load_dtype(device, precision))
    if source.merge_adapter is not None:
        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft vs transformers 5
            model = PeftModel.from_pretrained(model, str(source.merge_adapter)).merge_and_unload(safe_merge=True)
    model.config.use_cache = False
    return model


def _optimizer(parameters, learning_rate: float) -> torch.optim.Optimizer:
    # The fused kernel makes one pass over each tensor, on the CPU as on CUDA. The default foreach
    # kernel allocates a temporary per step of the update (sqrt, division, products): for full
    # fine-tuning on the CPU those passes over every parameter cost 11% of the step (bench/RESULTS.md).
    return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=WEIGHT_DECAY, fused=True)


def _scheduler(optimizer, schedule: str, warmup_steps: int, total_steps: int):
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)

    if schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup_steps)
    build = get_cosine_schedule_with_warmup if schedule == "cosine" else get_linear_schedule_with_warmup
    return build(optimizer, warmup_steps, total_steps)


def resolve_precision(asked: str, device: torch.device) -> str:
    """``fp32`` or ``bf16`` for ``asked`` ("auto" = bf16 where the hardware multiplies bf16 natively).

    bf16 here is autocast: the matmuls run in bf16, the weights, the optimizer and the
    loss's softmax stay fp32. On a CPU with AMX it measured 1.4x the fp32 step
    (bench/RESULTS.md); without native bf16 it would be slower than fp32, so "auto" keeps fp32.
    """
    return asked if asked != AUTO else native_precision(device)


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the autocast context each forward runs in."""
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


def _copy_generation_config(model):
    from transformers import GenerationConfig

    existing = getattr(model, "generation_config", None)
    if existing is None:
        return GenerationConfig.from_model_config(model.config)
    return GenerationConfig.from_dict(existing.to_dict())


def _write_model_info(folder: Path, name: str, run_dir: Path, model, template_source: str, end_of_turn: str,
                      eos_ids: list[int]) -> None:
    from dataclasses import asdict

    from tunesmith.models.store import META_FILE, ModelInfo

    info = ModelInfo(name=name, source=f"run:{run_dir}",
                     architecture=(model.config.architectures or [type(model).__name__])[0],
                     parameters=sum(p.numel() for p in model.parameters()),
                     chat_template_source=template_source, end_of_turn=end_of_turn, eos_token_ids=eos_ids)
    write_json(folder / META_FILE, asdict(info))


def _latest_metrics(metrics: MetricsLog) -> dict[str, Any]:
    return {column: metrics.last(column) for column in
            ("train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")}


def _metrics_line(row: dict, resolved: dict) -> str:
    line = f"step {row['step']}/{resolved['total_steps']}: train loss {row['train_loss']:.4f}"
    if row["valid_loss"] is not None:
        line += f", valid loss {row['valid_loss']:.4f}"
    return line


def _shown(resolved: dict) -> dict:
    keys = ("method", "n_epochs", "batch_size", "learning_rate", "learning_rate_multiplier", "total_steps",
            "warmup_steps", "schedule", "lora_r", "lora_alpha", "use_rslora", "trainable_parameters", "device")
    return {k: resolved[k] for k in keys if k in resolved}


# -------------------------------------------------------------------- run folders
def _new_manifest(config: TrainConfig, method, source: ModelSource, resolved: dict,
                  training: data.TrainingData, tokenizer) -> dict[str, Any]:
    _source, end_of_turn, eos_ids = apply_chat_template_and_eos(tokenizer)
    return {
        "format": MANIFEST_FORMAT,
        "name": Path(config.out).name,
        "status": RUNNING,
        "created_at": utc_now(),
        "finished_at": None,
        "config": config.to_dict(),
        "resolved": resolved,
        "method": method.name,
        "is_adapter": method.is_adapter,
        "base_model": {"ref": source.base_ref, "path": str(Path(source.base_path).resolve()),
                       "name": source.base_name},
        "parent_run": ({"name": source.parent.name, "path": str(source.parent.path)}
                       if source.parent is not None else None),
        "chat_template_source": _template_source(source, tokenizer),
        "end_of_turn": end_of_turn,
        "eos_token_ids": eos_ids,
        "drop_system": config.drop_system,
        "data": {"training_file": str(Path(config.data).resolve()), "training_sha256": training.fingerprint,
                 "n_train_examples": len(training.train), "n_replay_examples": training.replayed,
                 "validation_file": str(Path(config.validation).resolve()) if config.validation else None,
                 "n_valid_examples": len(training.valid)},
        "trained_tokens": 0,
        "progress": {"step": 0, "total_steps": resolved["total_steps"], "epoch": 0, "trained_tokens": 0},
        "metrics": {},
        "timings": {},
        "error": None,
    }


def _template_source(source: ModelSource, tokenizer) -> str:
    """Which chat template training renders with: the model's own, or one tunesmith built for it."""
    if source.parent is not None and source.parent.manifest.get("chat_template_source"):
        return source.parent.manifest["chat_template_source"]
    if source.info is not None:
        return source.info.chat_template_source
    from tunesmith.models.templates import template_for_tokens

    try:
        built = template_for_tokens(set(tokenizer.get_vocab()), tokenizer.eos_token)
    except ValueError:
        return "model"
    return built.name if tokenizer.chat_template == built.jinja else "model"


def _new_run_dir(config: TrainConfig) -> Path:
    """The folder a new run writes to; refuses one that already holds something."""
    if config.out is not None:
        out = Path(config.out).expanduser().resolve()
        if is_run_dir(out):
            raise TunesmithError(f"{out} already holds a run",
                                 "continue it with --resume, or choose another --out")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise TunesmithError(f"{out} exists and is not an empty folder", "choose another --out")
        return out
    root = settings.default_runs_dir()
    base = Path(config.model.rstrip("/")).name.removesuffix(".gguf") or "model"
    parts = [base, config.method] + ([config.suffix] if config.suffix else [])
    stem = "-".join(parts) + "-" + datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, n = root / stem, 2
    while candidate.exists():
        candidate, n = root / f"{stem}-{n}", n + 1
    return candidate.resolve()


def _find_resume_dir(config: TrainConfig) -> Path:
    """The run to resume: ``config.out``, or the newest unfinished run of this model, data and method."""
    if config.out is not None:
        return resumable_run_dir(config.out)
    wanted = (str(Path(config.data).resolve()), config.model, config.method)
    for run in reversed(list_runs(settings.default_runs_dir())):
        saved = run.manifest.get("config", {})
        if run.status != SUCCEEDED and (run.manifest.get("data", {}).get("training_file"), saved.get("model"),
                                        saved.get("method")) == wanted:
            return run.path
    raise NotFoundError(f"no unfinished run of {config.model} on {config.data} under {settings.default_runs_dir()}",
                        "pass the run folder with --out DIR --resume")


def _with_out(config: TrainConfig, run_dir: Path) -> TrainConfig:
    from dataclasses import replace

    return replace(config, out=str(run_dir))


def _check_resume_compatible(config: TrainConfig, manifest: dict) -> None:
    """Refuse to resume with settings or data that differ from the run's (all differences at once)."""
    saved = manifest.get("config", {})
    problems = [f"{key}: the run used {saved.get(key)!r}, now {getattr(config, key)!r}"
                for key in RESUME_LOCKED if key in saved and _normalised(saved.get(key)) != _normalised(
                    getattr(config, key))]
    if manifest.get("data", {}).get("training_sha256") not in (None, data.file_fingerprint(config.data)):
        problems.append(f"data: {config.data} changed since the run started")
    if problems:
        raise ConfigError(problems, "resume with the run's own settings (leave them out), or start a new run")


def _normalised(value):
    return list(value) if isinstance(value, tuple) else value


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[dict[str, str | None]]:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop; a second one stops at once."""
    flag: dict[str, str | None] = {"reason": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, _frame):
        if flag["reason"] is not None:
            raise KeyboardInterrupt
        flag["reason"] = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
