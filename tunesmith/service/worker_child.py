"""The training child: ``python -m tunesmith.service.worker_child JOB_ID``.

A worker runs each job in a process of its own, so that cancelling is killing
it and all its memory returns to the system. This module builds the job's
:class:`~tunesmith.train.config.TrainConfig`, calls the training recipe, and turns
its events into rows: events, metrics, checkpoints, trained tokens and the
estimated finish. It polls the job's row at every step: ``paused`` makes the
recipe save a checkpoint and stop; ``cancelled`` (or a job taken over by another
worker) stops it too.

Exit codes: 0 the job's outcome is recorded; 75 stopped by SIGTERM/SIGINT with a
checkpoint (the worker queues the job again); anything else a crash.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path

from sqlalchemy import insert, select, update

from tunesmith.errors import TunesmithError
from tunesmith.service import catalog, db, jobs
from tunesmith.service.context import ServiceContext
from tunesmith.service.errors import APIError
from tunesmith.service.files import add_local_file, path_of
from tunesmith.service.ids import new_id
from tunesmith.service.lifeline import die_with_parent, parent_gone
from tunesmith.service.projects import Project, project_by_id

log = logging.getLogger("tunesmith.service.worker_child")

EXIT_REQUEUE = 75
WORKER_ENV = "TUNESMITH_WORKER_ID"
STOP_POLL_S = 0.25
RESULTS_FILENAME = "step_metrics.csv"


class Stopper:
    """``should_stop`` for the recipe: reads the job's row (at most every STOP_POLL_S seconds)."""

    def __init__(self, ctx: ServiceContext, job_id: str, worker_id: str | None):
        self.ctx, self.job_id, self.worker_id = ctx, job_id, worker_id
        self.reason: str | None = None
        self._checked = 0.0

    def __call__(self) -> str | None:
        if parent_gone():  # the worker died: stop at once; the next worker resumes the job
            os._exit(1)
        if self.reason is not None or time.monotonic() - self._checked < STOP_POLL_S:
            return self.reason
        self._checked = time.monotonic()
        with self.ctx.engine.connect() as conn:
            row = conn.execute(select(db.jobs.c.status, db.jobs.c.worker_id).where(db.jobs.c.id == self.job_id)).one()
        if row.status == jobs.PAUSED:
            self.reason = "pause"
        elif row.status != jobs.RUNNING or (self.worker_id is not None and row.worker_id != self.worker_id):
            self.reason = "cancel"
        return self.reason


class Reporter:
    """``on_event`` for the recipe: every event becomes rows of the job."""

    def __init__(self, ctx: ServiceContext, row, fine_tuned: str):
        self.ctx, self.job_id, self.project_id, self.fine_tuned = ctx, row.id, row.project_id, fine_tuned
        settings = ctx.settings
        pairs = [(str(Path(row.run_dir).resolve()), f"<{row.id}>"), (str(Path(row.run_dir)), f"<{row.id}>")]
        pairs += [(str(path), name) for name, path in settings.extra_models.items()]
        pairs += [(str(settings.runs_dir.resolve()), "<runs>"), (str(settings.home.resolve()), "<home>"),
                  (str(settings.home), "<home>")]
        from tunesmith import settings as base_settings

        pairs.append((str(base_settings.models_dir().resolve()), "<models>"))
        # longest first, so a run folder is replaced before the home folder that contains it
        self.replacements = sorted(set(pairs), key=lambda p: len(p[0]), reverse=True)

    def __call__(self, event) -> None:
        handler = {"metrics": self.metrics, "checkpoint": self.checkpoint}.get(event.kind, self.message)
        handler(event)

    def message(self, event) -> None:
        data = event.data or None
        resolved = data.get("resolved", data) if data else None
        if isinstance(resolved, dict) and "n_epochs" in resolved and "batch_size" in resolved:
            self._record_resolved(resolved)
        with self.ctx.engine.begin() as conn:
            jobs.add_event(conn, self.job_id, self.scrub(event.message),
                           data=self.scrub(_jsonable(data)) if data else None)

    def scrub(self, value):
        """Server paths out of what the client sees: the run folder becomes the job id, other paths their names."""
        if isinstance(value, dict):
            return {k: self.scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.scrub(v) for v in value]
        if not isinstance(value, str):
            return value
        for path, name in self.replacements:
            value = value.replace(path, name)
        return value

    def _record_resolved(self, resolved: dict) -> None:
        with self.ctx.engine.begin() as conn:
            conn.execute(update(db.jobs).where(db.jobs.c.id == self.job_id).values(resolved=_jsonable(resolved)))

    def metrics(self, event) -> None:
        d = event.data
        step, total = int(d["step"]), d.get("total_steps")
        data = {"step": step, "train_loss": d.get("train_loss"), "train_mean_token_accuracy": d.get("train_accuracy"),
                "valid_loss": d.get("valid_loss"), "valid_mean_token_accuracy": d.get("valid_mean_token_accuracy"),
                "total_steps": total, "epoch": d.get("epoch"), "tokens": d.get("tokens"),
                "elapsed": d.get("elapsed"), "learning_rate": d.get("learning_rate")}
        with self.ctx.engine.begin() as conn:
            conn.execute(insert(db.job_metrics).values(
                job_id=self.job_id, step=step, train_loss=d.get("train_loss"), train_accuracy=d.get("train_accuracy"),
                valid_loss=d.get("valid_loss"), valid_mean_token_accuracy=d.get("valid_mean_token_accuracy"),
                tokens=d.get("tokens"), elapsed=d.get("elapsed"), created_at=db.now()))
            jobs.add_event(conn, self.job_id, self.scrub(event.message), type_="metrics",
                           data=_jsonable(data), step=step)
            conn.execute(update(db.jobs).where(db.jobs.c.id == self.job_id).values(
                trained_tokens=d.get("tokens"), estimated_finish=_estimated_finish(d)))

    def checkpoint(self, event) -> None:
        d = event.data
        step = int(d["step"])
        latest = d.get("metrics") or {}
        metrics = {"step": step, "train_loss": latest.get("train_loss"),
                   "train_mean_token_accuracy": latest.get("train_accuracy"),
                   "valid_loss": latest.get("valid_loss"),
                   "valid_mean_token_accuracy": latest.get("valid_mean_token_accuracy"),
                   "full_valid_loss": latest.get("valid_loss"),
                   "full_valid_mean_token_accuracy": latest.get("valid_mean_token_accuracy")}
        name = catalog.checkpoint_name(self.fine_tuned, step)
        with self.ctx.engine.begin() as conn:
            conn.execute(db.checkpoints.delete().where(db.checkpoints.c.fine_tuned_model_checkpoint == name))
            conn.execute(insert(db.checkpoints).values(
                id=new_id("ftckpt"), job_id=self.job_id, project_id=self.project_id, step=step, path=str(d["path"]),
                metrics=_jsonable(metrics), fine_tuned_model_checkpoint=name, created_at=db.now()))
            jobs.add_event(conn, self.job_id, f"Checkpoint created at step {step}",
                           data={"step": step, "fine_tuned_model_checkpoint": name})


def _estimated_finish(d: dict) -> int | None:
    step, total, elapsed = d.get("step"), d.get("total_steps"), d.get("elapsed")
    if not step or not total or elapsed is None:
        return None
    return int(time.time() + elapsed / step * max(total - step, 0))


def _jsonable(value):
    """Plain JSON values (tensors' floats, paths) for a JSON column."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def model_ref_for_training(ctx: ServiceContext, project: Project, row) -> str:
    """What the recipe starts from: a base model, or the run folder of a fine-tuned model."""
    found = catalog.resolve(ctx, project, row.model)
    if found.kind == "fine-tuned":
        return str(Path(found.ref).parent)  # the run folder: the recipe continues its adapter or weights
    return found.ref


def prepare_run_dir(ctx: ServiceContext, row) -> bool:
    """Whether to resume: a previous attempt left a run; a partial folder without a manifest is cleared.

    Also drops the rows of steps the resumed run will replay (after its last complete checkpoint).
    """
    from tunesmith.train import checkpoint as ckpt
    from tunesmith.train.runs import is_run_dir

    run_dir = Path(row.run_dir)
    if is_run_dir(run_dir):
        latest = ckpt.latest_resumable(run_dir)
        step = (ckpt.step_of(latest) or 0) if latest is not None else 0
        with ctx.engine.begin() as conn:
            jobs.forget_after_step(conn, row.id, step)
            jobs.add_event(conn, row.id, f"Resuming from checkpoint step {step}" if step
                           else "No checkpoint was saved yet: training starts over", data={"step": step})
        return True
    if run_dir.exists():
        shutil.rmtree(run_dir)
    with ctx.engine.begin() as conn:
        jobs.forget_after_step(conn, row.id, 0)
    return False


def finish(ctx: ServiceContext, row, project: Project, fine_tuned: str, result) -> None:
    """Record a succeeded run: result file, fine-tuned model, tokens, resolved hyperparameters."""
    from tunesmith.train.runs import METRICS_CSV

    result_files = []
    metrics_csv = Path(result.run_dir) / METRICS_CSV
    if metrics_csv.is_file():
        result_files.append(add_local_file(ctx, row.project_id, metrics_csv, filename=RESULTS_FILENAME,
                                           purpose="fine-tune-results"))
    with ctx.engine.begin() as conn:
        moved = conn.execute(update(db.jobs).where(db.jobs.c.id == row.id).where(db.jobs.c.status == jobs.RUNNING)
                             .values(status=jobs.SUCCEEDED, fine_tuned_model=fine_tuned,
                                     final_dir=str(result.final_dir), trained_tokens=result.trained_tokens,
                                     finished_at=db.now(), estimated_finish=None, result_files=result_files,
                                     error=None)).rowcount
        if moved:
            jobs.add_event(conn, row.id, f"New fine-tuned model created: {fine_tuned}",
                           data={"fine_tuned_model": fine_tuned, "trained_tokens": result.trained_tokens,
                                 "steps": result.steps})
            jobs.add_event(conn, row.id, "The job has successfully completed")


def run(ctx: ServiceContext, job_id: str, worker_id: str | None) -> int:
    """Train one job to its end (or until stopped); returns the process exit code."""
    from tunesmith.train.recipe import train

    with ctx.engine.connect() as conn:
        row = conn.execute(select(db.jobs).where(db.jobs.c.id == job_id)).one()
        project = project_by_id(conn, row.project_id)
        data = path_of(conn, ctx, row.project_id, row.training_file)
        validation = path_of(conn, ctx, row.project_id, row.validation_file) if row.validation_file else None
    fine_tuned = catalog.fine_tuned_name(row.base_model, project.name, row.suffix, row.id)
    stopper = Stopper(ctx, job_id, worker_id)
    try:
        config = jobs.train_config(ctx, model_ref=model_ref_for_training(ctx, project, row), data=data,
                                   validation=validation, hyper=dict(row.hyperparameters), options=dict(row.options or {}),
                                   seed=row.seed, suffix=row.suffix, out=Path(row.run_dir))
        resume = prepare_run_dir(ctx, row)
        with ctx.engine.begin() as conn:
            jobs.add_event(conn, job_id, "Fine-tuning job started")
        result = train(config, resume=resume, on_event=Reporter(ctx, row, fine_tuned), should_stop=stopper)
    except APIError as exc:  # the model it starts from was deleted meanwhile, a file is missing, ...
        jobs.fail(ctx, job_id, exc.code or "invalid_request", exc.message, exc.param, from_statuses=(jobs.RUNNING,))
        return 0
    except TunesmithError as exc:
        message = exc.message
        problems = [p for p in getattr(exc, "problems", []) if p not in message]
        if problems:
            message += "\n" + "\n".join(problems)
        jobs.fail(ctx, job_id, exc.code or "training_error", message, exc.param, from_statuses=(jobs.RUNNING,))
        return 0
    except Exception as exc:
        log.exception("job %s crashed", job_id)
        jobs.fail(ctx, job_id, "server_error", f"Training failed with an unexpected {type(exc).__name__}: {exc}",
                  None, from_statuses=(jobs.RUNNING,))
        return 0
    if result.status == "succeeded":
        finish(ctx, row, project, fine_tuned, result)
        return 0
    if stopper.reason is None:  # stopped by SIGTERM/SIGINT: the server is shutting down
        return EXIT_REQUEUE
    if stopper.reason == "pause":
        with ctx.engine.begin() as conn:
            jobs.add_event(conn, job_id, f"Paused at step {result.steps}: checkpoint saved",
                           data={"step": result.steps})
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the training child."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tunesmith.service.worker_child JOB_ID", file=sys.stderr)
        return 2
    die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ctx = ServiceContext.from_env()
    return run(ctx, args[0], os.environ.get(WORKER_ENV))


if __name__ == "__main__":
    sys.exit(main())
