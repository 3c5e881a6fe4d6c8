"""The models a project can name: registered base models, its fine-tuned models and checkpoints.

A request names a model; only this catalogue turns the name into a folder on the
server. Names that look like paths or URLs are refused with 400, so an API key
never makes the server read an arbitrary file.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select, update

from tunesmith.service import db
from tunesmith.service.context import ServiceContext
from tunesmith.service.errors import APIError, bad_request, conflict
from tunesmith.service.files import ACTIVE_JOB_STATUSES
from tunesmith.service.ids import short_part
from tunesmith.service.projects import Project

FT_PREFIX = "ft:"
BASE_OWNER = "tunesmith"


@dataclass(frozen=True)
class ResolvedModel:
    """A model name resolved for this project.

    Attributes:
        name: the name as requested.
        ref: what the training and inference layers load (a registered name or a folder path).
        kind: "base", "fine-tuned" or "checkpoint".
        base_name: the root base model's name (used in fine-tuned names).
        job_id: the job that made it (fine-tuned and checkpoint models).
    """

    name: str
    ref: str
    kind: str
    base_name: str
    job_id: str | None = None


def fine_tuned_name(base: str, project: str, suffix: str | None, job_id: str) -> str:
    """``ft:{base}:{project}:{suffix}:{id}`` (an empty suffix stays empty, as in OpenAI's names)."""
    return f"{FT_PREFIX}{base}:{project}:{suffix or ''}:{short_part(job_id)}"


def checkpoint_name(fine_tuned: str, step: int) -> str:
    """The model name of a job's checkpoint: ``{fine-tuned name}:ckpt-step-{N}``."""
    return f"{fine_tuned}:ckpt-step-{step}"


def check_model_name(name: str, param: str = "model") -> None:
    """400 for anything that is not a plain model name (paths, ``..``, URLs, empty)."""
    if not isinstance(name, str) or not name.strip():
        raise bad_request("A model name is required.", param=param)
    looks_like_path = ("/" in name or "\\" in name or ".." in name or name.startswith("~")
                       or "://" in name or Path(name).is_absolute() or "\x00" in name)
    if looks_like_path or len(name) > 512:
        raise bad_request(f"Invalid model {name!r}: name a model from GET /v1/models; paths and URLs are not "
                          "accepted.", param=param, code="invalid_model")


def base_models(ctx: ServiceContext) -> dict[str, str]:
    """Base model name → what to load: the registered models, then the administrator's extra folders."""
    from tunesmith.models.registry import REGISTRY

    found = {name: name for name in REGISTRY}
    found.update({name: str(path) for name, path in ctx.settings.extra_models.items()})
    return found


def resolve(ctx: ServiceContext, project: Project, name: str, param: str = "model") -> ResolvedModel:
    """The model this project means by ``name``.

    Raises:
        APIError: 400 for a path-like name, 404 for an unknown or deleted model (or another project's).
    """
    check_model_name(name, param)
    bases = base_models(ctx)
    if name in bases:
        return ResolvedModel(name, bases[name], "base", name)
    if name.startswith(FT_PREFIX):
        with ctx.engine.connect() as conn:
            job = conn.execute(select(db.jobs).where(db.jobs.c.fine_tuned_model == name)
                               .where(db.jobs.c.project_id == project.id)
                               .where(db.jobs.c.model_deleted_at.is_(None))).first()
            if job is not None and job.final_dir:
                return ResolvedModel(name, job.final_dir, "fine-tuned", job.base_model, job.id)
            ckpt = conn.execute(select(db.checkpoints, db.jobs.c.base_model)
                                .join(db.jobs, db.jobs.c.id == db.checkpoints.c.job_id)
                                .where(db.checkpoints.c.fine_tuned_model_checkpoint == name)
                                .where(db.checkpoints.c.project_id == project.id)
                                .where(db.checkpoints.c.deleted_at.is_(None))).first()
            if ckpt is not None:
                return ResolvedModel(name, ckpt.path, "checkpoint", ckpt.base_model, ckpt.job_id)
    raise APIError(404, f"The model '{name}' does not exist or you do not have access to it.",
                   param=param, code="model_not_found")


def _base_created(ref: str) -> int:
    path = Path(ref)
    if not path.is_dir():
        from tunesmith.models.store import cache_path

        path = cache_path(ref)
    try:
        return int(path.stat().st_mtime)
    except OSError:
        return 0


def model_object(model_id: str, created: int, owned_by: str) -> dict:
    """OpenAI's ``model`` object."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


def list_models(ctx: ServiceContext, project: Project) -> dict:
    """Base models, then this project's fine-tuned models and checkpoints (newest first)."""
    data = [model_object(name, _base_created(ref), BASE_OWNER) for name, ref in base_models(ctx).items()]
    with ctx.engine.connect() as conn:
        tuned = conn.execute(select(db.jobs.c.fine_tuned_model, db.jobs.c.finished_at, db.jobs.c.created_at)
                             .where(db.jobs.c.project_id == project.id)
                             .where(db.jobs.c.fine_tuned_model.is_not(None))
                             .where(db.jobs.c.final_dir.is_not(None))
                             .where(db.jobs.c.model_deleted_at.is_(None)).order_by(db.jobs.c.seq.desc()))
        data += [model_object(r.fine_tuned_model, r.finished_at or r.created_at, project.name) for r in tuned]
        ckpts = conn.execute(select(db.checkpoints.c.fine_tuned_model_checkpoint, db.checkpoints.c.created_at)
                             .where(db.checkpoints.c.project_id == project.id)
                             .where(db.checkpoints.c.deleted_at.is_(None)).order_by(db.checkpoints.c.seq.desc()))
        data += [model_object(r.fine_tuned_model_checkpoint, r.created_at, project.name) for r in ckpts]
    return {"object": "list", "data": data}


def retrieve(ctx: ServiceContext, project: Project, name: str) -> dict:
    """The ``model`` object for one name."""
    found = resolve(ctx, project, name)
    if found.kind == "base":
        return model_object(name, _base_created(found.ref), BASE_OWNER)
    return next(m for m in list_models(ctx, project)["data"] if m["id"] == name)


def remove(ctx: ServiceContext, project: Project, name: str) -> dict:
    """Delete a fine-tuned model or checkpoint of this project (its weights too).

    Raises:
        APIError: 403 for a base model, 404 unknown, 409 while a job still needs it.
    """
    found = resolve(ctx, project, name)
    if found.kind == "base":
        raise APIError(403, f"The base model '{name}' cannot be deleted; only fine-tuned models and checkpoints "
                            "can.", param="model", code="model_not_deletable")
    with ctx.engine.begin() as conn:
        user = conn.execute(select(db.jobs.c.id).where(db.jobs.c.model == name)
                            .where(db.jobs.c.status.in_(ACTIVE_JOB_STATUSES))).first()
        if user is not None:
            raise conflict(f"The model '{name}' is the base of job '{user.id}', which has not finished; "
                           "cancel it or wait for it first.", code="model_in_use")
        if found.kind == "fine-tuned":
            conn.execute(update(db.jobs).where(db.jobs.c.id == found.job_id).values(model_deleted_at=db.now()))
        else:
            job_status = conn.execute(select(db.jobs.c.status).where(db.jobs.c.id == found.job_id)).scalar_one()
            if job_status in ACTIVE_JOB_STATUSES:
                raise conflict(f"The checkpoint '{name}' belongs to job '{found.job_id}', which has not finished "
                               "and may resume from it.", code="model_in_use")
            conn.execute(update(db.checkpoints).where(db.checkpoints.c.fine_tuned_model_checkpoint == name)
                         .values(deleted_at=db.now()))
    _remove_weights(ctx, Path(found.ref))
    return {"id": name, "object": "model", "deleted": True}


def _remove_weights(ctx: ServiceContext, folder: Path) -> None:
    """Delete a model folder, but only one inside the service's runs folder."""
    runs = ctx.settings.runs_dir.resolve()
    folder = folder.resolve()
    if folder.is_dir() and runs in folder.parents:
        shutil.rmtree(folder, ignore_errors=True)
