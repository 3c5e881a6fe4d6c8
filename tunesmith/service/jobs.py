"""Fine-tuning jobs: create (with validation), list, retrieve, cancel, pause, resume, events, checkpoints.

A job is a row; the worker (``service.worker``) runs it. Status flow::

    validating_files → queued → running → succeeded | failed | cancelled
                         ↑         ↓
                         └─ paused ┘   (pause / resume)

Every state change is one conditional UPDATE (``WHERE status IN (...)``) whose
row count says whether it happened, so the API and the workers never overwrite
each other's decision.
"""

from __future__ import annotations

import logging
import secrets
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection

from tunesmith.service import catalog, db
from tunesmith.service.context import ServiceContext
from tunesmith.service.errors import APIError, bad_request, conflict, not_found
from tunesmith.service.files import data_problems, path_of, problems_message
from tunesmith.service.ids import new_id
from tunesmith.service.pagination import check_limit, list_object, page
from tunesmith.service.projects import Project
from tunesmith.service.schemas.jobs import TUNESMITH_FIELDS, Hyperparameters, JobCreate, TunesmithOptions

log = logging.getLogger("tunesmith.service.jobs")

VALIDATING, QUEUED, RUNNING, PAUSED = "validating_files", "queued", "running", "paused"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
FINISHED = (SUCCEEDED, FAILED, CANCELLED)
OPENAI_FIELDS = {"model", "training_file", "validation_file", "suffix", "seed", "metadata", "hyperparameters",
                 "method", "integrations", "tunesmith"}
MAX_METADATA_PAIRS = 16


# ----------------------------------------------------------------------------- public objects

def _hyperparameters(row) -> dict:
    """The resolved numbers once training has resolved them, the request ("auto" kept) before."""
    resolved = row.resolved or {}
    return {k: resolved.get(k, row.hyperparameters.get(k, "auto"))
            for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}


def public(row) -> dict:
    """The OpenAI ``fine_tuning.job`` object of a row."""
    hyper = _hyperparameters(row)
    return {
        "id": row.id, "object": "fine_tuning.job", "created_at": row.created_at, "error": row.error,
        "fine_tuned_model": row.fine_tuned_model if row.status == SUCCEEDED else None,
        "finished_at": row.finished_at, "hyperparameters": hyper, "model": row.model,
        "organization_id": row.project_id, "result_files": list(row.result_files or []), "seed": row.seed,
        "status": row.status, "trained_tokens": row.trained_tokens, "training_file": row.training_file,
        "validation_file": row.validation_file,
        "estimated_finish": row.estimated_finish if row.status == RUNNING else None,
        "integrations": [], "metadata": row.metadata,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
        "user_provided_suffix": row.suffix, "tunesmith": dict(row.options or {}),
    }


def event_public(row) -> dict:
    """The OpenAI ``fine_tuning.job.event`` object of an event row."""
    return {"id": row.id, "object": "fine_tuning.job.event", "created_at": row.created_at, "level": row.level,
            "message": row.message, "data": row.data, "type": row.type}


def checkpoint_public(row) -> dict:
    """The OpenAI ``fine_tuning.job.checkpoint`` object of a checkpoint row."""
    metrics = dict(row.metrics or {})
    metrics["step"] = row.step
    return {"id": row.id, "object": "fine_tuning.job.checkpoint", "created_at": row.created_at,
            "fine_tuned_model_checkpoint": row.fine_tuned_model_checkpoint, "fine_tuning_job_id": row.job_id,
            "metrics": metrics, "step_number": row.step}


# ----------------------------------------------------------------------------- events

def add_event(conn: Connection, job_id: str, message: str, *, level: str = "info", type_: str = "message",
              data: dict | None = None, step: int | None = None) -> None:
    """Append an event to a job's log."""
    conn.execute(insert(db.job_events).values(id=new_id("ftevent"), job_id=job_id, created_at=db.now(),
                                              level=level, type=type_, message=message, data=data, step=step))


# ----------------------------------------------------------------------------- create

def _options(request: JobCreate) -> dict[str, Any]:
    """tunesmith's settings from ``tunesmith`` and from top-level extra fields (400 for unknown fields)."""
    extras = dict(request.model_extra or {})
    unknown = sorted(k for k in extras if k not in TUNESMITH_FIELDS)
    if unknown:
        raise bad_request(f"Unknown parameter(s): {', '.join(unknown)}. tunesmith settings are: "
                          f"{', '.join(TUNESMITH_FIELDS)}.", param=unknown[0], code="unknown_parameter")
    nested = request.tunesmith.model_dump(exclude_none=True) if request.tunesmith else {}
    if isinstance(request.method, str):
        extras["method"] = request.method
    try:
        top = TunesmithOptions.model_validate(extras).model_dump(exclude_none=True)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        first = ".".join(str(p) for p in exc.errors()[0]["loc"]) if exc.errors() else None
        raise bad_request(f"Invalid tunesmith setting: {problems}", param=first) from None
    clash = sorted(k for k in set(nested) & set(top) if nested[k] != top[k])
    if clash:
        raise bad_request(f"{clash[0]} is given twice with different values (top level and in 'tunesmith').",
                          param=clash[0])
    return {**top, **nested}


def _hyper(request: JobCreate) -> dict[str, Any]:
    """n_epochs/batch_size/learning_rate_multiplier from ``method`` or the legacy ``hyperparameters``."""
    method = request.method if not isinstance(request.method, str) else None
    if method is not None and method.type != "supervised":
        raise bad_request(f"method.type {method.type!r} is not supported: tunesmith trains 'supervised' jobs.",
                          param="method.type", code="unsupported_method")
    from_method = method.supervised.hyperparameters if method and method.supervised else None
    if from_method is not None and request.hyperparameters is not None:
        raise bad_request("Give hyperparameters in method.supervised.hyperparameters or in the legacy "
                          "hyperparameters field, not both.", param="hyperparameters")
    chosen = from_method or request.hyperparameters or Hyperparameters()
    return {k: ("auto" if v is None else v) for k, v in chosen.model_dump().items()}


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_PAIRS:
        raise bad_request(f"metadata may hold at most {MAX_METADATA_PAIRS} pairs.", param="metadata")
    for key, value in metadata.items():
        if len(key) > 64 or len(value) > 512:
            raise bad_request(f"metadata key {key[:64]!r}: keys are at most 64 characters and values at most 512.",
                              param="metadata")


def _check_suffix(suffix: str | None) -> None:
    if suffix is None:
        return
    if not (0 < len(suffix) <= 64 and all(c.isalnum() or c in "-_" for c in suffix)):
        raise bad_request(f"suffix {suffix!r} must be 1-64 characters of letters, digits, '-' or '_'.",
                          param="suffix")


def _training_source(ctx: ServiceContext, project: Project, name: str) -> catalog.ResolvedModel:
    """The model a job starts from: a base model or one of this project's fine-tuned models."""
    try:
        found = catalog.resolve(ctx, project, name)
    except APIError as exc:
        if exc.status == 404:
            raise bad_request(f"Model {name!r} is not available for fine-tuning: use a base model from "
                              "GET /v1/models or one of your fine-tuned models.", param="model",
                              code="model_not_available") from None
        raise
    if found.kind == "checkpoint":
        raise bad_request(f"{name!r} is a checkpoint; continue fine-tuning from a job's fine_tuned_model.",
                          param="model", code="model_not_available")
    return found


def _file_path(conn: Connection, ctx: ServiceContext, project: Project, file_id: str, param: str) -> Path:
    row = conn.execute(select(db.files).where(db.files.c.id == file_id)
                       .where(db.files.c.project_id == project.id)).first()
    if row is None:
        raise bad_request(f"Invalid {param}: no such file {file_id!r}.", param=param, code="invalid_file")
    if row.purpose != "fine-tune":
        raise bad_request(f"Invalid {param}: file {file_id!r} has purpose {row.purpose!r}; upload it with "
                          "purpose 'fine-tune'.", param=param, code="invalid_file")
    return path_of(conn, ctx, project.id, file_id)


def train_config(ctx: ServiceContext, *, model_ref: str, data: Path, validation: Path | None, hyper: dict,
                 options: dict, seed: int, suffix: str | None, out: Path):
    """The training layer's config for a job (the one typed config the CLI builds too)."""
    from tunesmith.train.config import TrainConfig

    values = dict(options)
    return TrainConfig(model=model_ref, data=str(data), validation=str(validation) if validation else None,
                       epochs=hyper["n_epochs"], batch_size=hyper["batch_size"],
                       learning_rate_multiplier=hyper["learning_rate_multiplier"], seed=seed, suffix=suffix,
                       out=str(out), device=ctx.settings.device, **values)


def create(ctx: ServiceContext, project: Project, request: JobCreate, validator: Executor | None) -> dict:
    """Create a job in ``validating_files``; its files are checked in the background.

    Raises:
        APIError: 400 for invalid settings (all of them at once), unknown files or models.
    """
    options = _options(request)
    hyper = _hyper(request)
    _check_metadata(request.metadata)
    _check_suffix(request.suffix)
    if request.integrations:
        raise bad_request("integrations are not supported by tunesmith.", param="integrations")
    source = _training_source(ctx, project, request.model)
    seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
    job_id = new_id("ftjob")
    run_dir = ctx.settings.runs_dir / job_id
    with ctx.engine.connect() as conn:
        data = _file_path(conn, ctx, project, request.training_file, "training_file")
        validation = (_file_path(conn, ctx, project, request.validation_file, "validation_file")
                      if request.validation_file is not None else None)
    config = train_config(ctx, model_ref=source.ref, data=data, validation=validation, hyper=hyper,
                          options=options, seed=seed, suffix=request.suffix, out=run_dir)
    problems = config.problems()
    if problems:
        raise APIError(400, "Invalid fine-tuning settings:\n" + "\n".join(problems), param="hyperparameters",
                       code="invalid_config")
    with ctx.engine.begin() as conn:
        conn.execute(insert(db.jobs).values(
            id=job_id, project_id=project.id, model=request.model, base_model=source.base_name,
            training_file=request.training_file, validation_file=request.validation_file, suffix=request.suffix,
            seed=seed, metadata=request.metadata, hyperparameters=hyper, method={"type": "supervised"},
            options=options, status=VALIDATING, result_files=[], created_at=db.now(), attempts=0, resume=0,
            run_dir=str(run_dir)))
        add_event(conn, job_id, f"Created fine-tuning job: {job_id}")
        row = get_row(conn, project, job_id)
    if validator is not None:
        validator.submit(validate_files, ctx, job_id)
    return public(row)


def validate_files(ctx: ServiceContext, job_id: str) -> str:
    """Check a job's files with the data layer; move it to ``queued`` or ``failed``. Returns the new status."""
    try:
        with ctx.engine.connect() as conn:
            row = conn.execute(select(db.jobs).where(db.jobs.c.id == job_id)).one()
            if row.status != VALIDATING:
                return row.status
            base_ref = catalog.base_models(ctx).get(row.base_model, row.base_model)
            checks = [("training_file", row.training_file)]
            if row.validation_file:
                checks.append(("validation_file", row.validation_file))
            paths = [(param, fid, path_of(conn, ctx, row.project_id, fid), _filename(conn, fid))
                     for param, fid in checks]
        for param, file_id, path, filename in paths:
            problems = data_problems(path, filename, model=base_ref)
            if problems:
                return fail(ctx, job_id, "invalid_training_file" if param == "training_file"
                            else "invalid_validation_file", problems_message(f"{file_id} ({filename})", problems),
                            param, from_statuses=(VALIDATING,))
    except APIError as exc:
        return fail(ctx, job_id, exc.code or "invalid_file", exc.message, exc.param, from_statuses=(VALIDATING,))
    except Exception as exc:  # the job must not stay in validating_files forever
        log.exception("validating the files of %s failed", job_id)
        return fail(ctx, job_id, "validation_error", f"Validating the files failed: {exc}", None,
                    from_statuses=(VALIDATING,))
    with ctx.engine.begin() as conn:
        moved = conn.execute(update(db.jobs).where(db.jobs.c.id == job_id).where(db.jobs.c.status == VALIDATING)
                             .values(status=QUEUED)).rowcount
        if moved:
            add_event(conn, job_id, "Validated training file", data={"files": [p[1] for p in paths]})
            add_event(conn, job_id, "Fine-tuning job queued")
    return QUEUED


def _filename(conn: Connection, file_id: str) -> str:
    return conn.execute(select(db.files.c.filename).where(db.files.c.id == file_id)).scalar_one()


def fail(ctx: ServiceContext, job_id: str, code: str, message: str, param: str | None,
         from_statuses: tuple[str, ...] = (VALIDATING, QUEUED, RUNNING)) -> str:
    """Mark a job failed with an OpenAI ``error`` object (only from ``from_statuses``)."""
    with ctx.engine.begin() as conn:
        moved = conn.execute(update(db.jobs).where(db.jobs.c.id == job_id)
                             .where(db.jobs.c.status.in_(from_statuses))
                             .values(status=FAILED, finished_at=db.now(), estimated_finish=None,
                                     error={"code": code, "message": message, "param": param})).rowcount
        if moved:
            add_event(conn, job_id, message, level="error")
        return conn.execute(select(db.jobs.c.status).where(db.jobs.c.id == job_id)).scalar_one()


def revalidate_pending(ctx: ServiceContext, validator: Executor) -> int:
    """Queue the validation of jobs left in ``validating_files`` (the server stopped meanwhile)."""
    with ctx.engine.connect() as conn:
        ids = [r.id for r in conn.execute(select(db.jobs.c.id).where(db.jobs.c.status == VALIDATING)
                                          .order_by(db.jobs.c.seq))]
    for job_id in ids:
        validator.submit(validate_files, ctx, job_id)
    return len(ids)


# ----------------------------------------------------------------------------- read

def get_row(conn: Connection, project: Project, job_id: str):
    """The project's job row; 404 when unknown or another project's."""
    row = conn.execute(select(db.jobs).where(db.jobs.c.id == job_id).where(db.jobs.c.project_id == project.id)).first()
    if row is None:
        raise not_found("fine-tuning job", job_id, param="fine_tuning_job_id")
    return row


def retrieve(ctx: ServiceContext, project: Project, job_id: str) -> dict:
    """The public object of one job."""
    with ctx.engine.connect() as conn:
        return public(get_row(conn, project, job_id))


def list_jobs(ctx: ServiceContext, project: Project, *, after: str | None, limit: int | None,
              metadata: dict[str, str] | None) -> dict:
    """A page of the project's jobs, newest first, optionally only those whose metadata has these pairs."""
    query = select(db.jobs).where(db.jobs.c.project_id == project.id)
    limit = check_limit(limit)
    with ctx.engine.connect() as conn:
        if not metadata:
            rows, more = page(conn, db.jobs, query, after=after, limit=limit, kind="fine-tuning job")
        else:
            # JSON filtering differs between databases; the project's jobs are few, so filter here.
            rows, more = page(conn, db.jobs, query, after=after, limit=10**9, kind="fine-tuning job")
            rows = [r for r in rows if all((r.metadata or {}).get(k) == v for k, v in metadata.items())]
            rows, more = rows[:limit], len(rows) > limit
    return list_object([public(r) for r in rows], more)


def list_events(ctx: ServiceContext, project: Project, job_id: str, *, after: str | None,
                limit: int | None) -> dict:
    """A page of a job's events, newest first."""
    with ctx.engine.connect() as conn:
        get_row(conn, project, job_id)
        query = select(db.job_events).where(db.job_events.c.job_id == job_id)
        rows, more = page(conn, db.job_events, query, after=after, limit=check_limit(limit), kind="event")
    return list_object([event_public(r) for r in rows], more)


def list_checkpoints(ctx: ServiceContext, project: Project, job_id: str, *, after: str | None,
                     limit: int | None) -> dict:
    """A page of a job's checkpoints, newest first."""
    with ctx.engine.connect() as conn:
        get_row(conn, project, job_id)
        query = (select(db.checkpoints).where(db.checkpoints.c.job_id == job_id)
                 .where(db.checkpoints.c.deleted_at.is_(None)))
        rows, more = page(conn, db.checkpoints, query, after=after, limit=check_limit(limit, 10),
                          kind="checkpoint")
    return list_object([checkpoint_public(r) for r in rows], more)


# ----------------------------------------------------------------------------- control

def _transition(ctx: ServiceContext, project: Project, job_id: str, *, allowed: tuple[str, ...], values: dict,
                action: str, done: str, message: str) -> dict:
    with ctx.engine.begin() as conn:
        row = get_row(conn, project, job_id)
        moved = conn.execute(update(db.jobs).where(db.jobs.c.id == job_id).where(db.jobs.c.status.in_(allowed))
                             .values(**values)).rowcount
        if not moved:
            raise conflict(f"Cannot {action} job '{job_id}': its status is '{row.status}'; only a job that is "
                           f"{', '.join(allowed)} can be {done}.", code="invalid_job_status")
        add_event(conn, job_id, message)
        return public(get_row(conn, project, job_id))


def cancel(ctx: ServiceContext, project: Project, job_id: str) -> dict:
    """Cancel a job that has not finished; a running one is stopped by its worker at once."""
    return _transition(ctx, project, job_id, allowed=(VALIDATING, QUEUED, RUNNING, PAUSED),
                       values={"status": CANCELLED, "finished_at": db.now(), "estimated_finish": None},
                       action="cancel", done="cancelled", message="Fine-tuning job cancelled")


def pause(ctx: ServiceContext, project: Project, job_id: str) -> dict:
    """Pause a queued or running job; a running one saves a checkpoint and stops."""
    return _transition(ctx, project, job_id, allowed=(QUEUED, RUNNING), values={"status": PAUSED},
                       action="pause", done="paused", message="Fine-tuning job paused")


def resume(ctx: ServiceContext, project: Project, job_id: str) -> dict:
    """Queue a paused job again; it continues from its last checkpoint."""
    return _transition(ctx, project, job_id, allowed=(PAUSED,), values={"status": QUEUED, "resume": 1},
                       action="resume", done="resumed", message="Fine-tuning job resumed: queued to continue from its last checkpoint")


def forget_after_step(conn: Connection, job_id: str, step: int) -> None:
    """Drop metrics and checkpoint rows past ``step`` (a resumed run replays those steps)."""
    conn.execute(delete(db.job_metrics).where(db.job_metrics.c.job_id == job_id).where(db.job_metrics.c.step > step))
    conn.execute(delete(db.job_events).where(db.job_events.c.job_id == job_id)
                 .where(db.job_events.c.type == "metrics").where(db.job_events.c.step > step))
    conn.execute(delete(db.checkpoints).where(db.checkpoints.c.job_id == job_id).where(db.checkpoints.c.step > step))


__all__ = ["create", "retrieve", "list_jobs", "list_events", "list_checkpoints", "cancel", "pause",
           "resume", "validate_files", "revalidate_pending", "fail", "add_event", "public", "train_config"]
