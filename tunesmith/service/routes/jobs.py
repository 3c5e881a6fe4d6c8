"""/v1/fine_tuning/jobs"""

from __future__ import annotations

from fastapi import APIRouter, Request

from tunesmith.service import jobs
from tunesmith.service.deps import Ctx, CurrentProject
from tunesmith.service.schemas.common import ListPublic
from tunesmith.service.schemas.jobs import CheckpointPublic, EventPublic, JobCreate, JobPublic

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])


def metadata_filter(request: Request) -> dict[str, str] | None:
    """``metadata[key]=value`` query pairs (the client's deep-object form)."""
    found = {k[len("metadata["):-1]: v for k, v in request.query_params.items()
             if k.startswith("metadata[") and k.endswith("]")}
    return found or None


@router.post("", response_model=JobPublic)
def create_job(body: JobCreate, request: Request, ctx: Ctx, project: CurrentProject):
    """Create a fine-tuning job (validated, then queued for a worker)."""
    return jobs.create(ctx, project, body, request.app.state.validator)


@router.get("", response_model=ListPublic[JobPublic])
def list_jobs(request: Request, ctx: Ctx, project: CurrentProject, after: str | None = None,
              limit: int | None = None):
    """The project's jobs, newest first; ``metadata[k]=v`` filters."""
    return jobs.list_jobs(ctx, project, after=after, limit=limit, metadata=metadata_filter(request))


@router.get("/{job_id}", response_model=JobPublic)
def retrieve_job(job_id: str, ctx: Ctx, project: CurrentProject):
    """One job."""
    return jobs.retrieve(ctx, project, job_id)


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: str, ctx: Ctx, project: CurrentProject):
    """Cancel a job that has not finished."""
    return jobs.cancel(ctx, project, job_id)


@router.post("/{job_id}/pause", response_model=JobPublic)
def pause_job(job_id: str, ctx: Ctx, project: CurrentProject):
    """Pause a queued or running job (a running one checkpoints first)."""
    return jobs.pause(ctx, project, job_id)


@router.post("/{job_id}/resume", response_model=JobPublic)
def resume_job(job_id: str, ctx: Ctx, project: CurrentProject):
    """Resume a paused job from its last checkpoint."""
    return jobs.resume(ctx, project, job_id)


@router.get("/{job_id}/events", response_model=ListPublic[EventPublic])
def list_events(job_id: str, ctx: Ctx, project: CurrentProject, after: str | None = None,
                limit: int | None = None):
    """The job's events, newest first."""
    return jobs.list_events(ctx, project, job_id, after=after, limit=limit)


@router.get("/{job_id}/checkpoints", response_model=ListPublic[CheckpointPublic])
def list_checkpoints(job_id: str, ctx: Ctx, project: CurrentProject, after: str | None = None,
                     limit: int | None = None):
    """The job's checkpoints, newest first; each is usable as a model."""
    return jobs.list_checkpoints(ctx, project, job_id, after=after, limit=limit)
