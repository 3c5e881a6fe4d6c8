"""/v1/files"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from tunesmith.service import files
from tunesmith.service.deps import Ctx, CurrentProject
from tunesmith.service.schemas.common import DeletedPublic, ListPublic
from tunesmith.service.schemas.files import FilePublic
from tunesmith.service.uploads import receive_upload

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("", response_model=FilePublic)
async def upload_file(request: Request, ctx: Ctx, project: CurrentProject):
    """Upload a file (multipart: ``file``, ``purpose``); streamed to disk, checked, stored by content."""
    upload = await receive_upload(request, files.incoming_dir(ctx), ctx.settings.max_upload_bytes)
    return await run_in_threadpool(files.store_upload, ctx, project, upload)


@router.get("", response_model=ListPublic[FilePublic])
def list_files(ctx: Ctx, project: CurrentProject, after: str | None = None, limit: int | None = None,
               order: str | None = None, purpose: str | None = None):
    """The project's files, newest first."""
    return files.list_files(ctx, project, after=after, limit=limit, order=order, purpose=purpose)


@router.get("/{file_id}", response_model=FilePublic)
def retrieve_file(file_id: str, ctx: Ctx, project: CurrentProject):
    """One file."""
    return files.retrieve(ctx, project, file_id)


@router.get("/{file_id}/content")
def file_content(file_id: str, ctx: Ctx, project: CurrentProject):
    """The file's bytes (streamed from disk)."""
    path, filename = files.content_path(ctx, project, file_id)
    return FileResponse(path, filename=filename, media_type="application/octet-stream")


@router.delete("/{file_id}", response_model=DeletedPublic)
def delete_file(file_id: str, ctx: Ctx, project: CurrentProject):
    """Delete a file."""
    return files.remove(ctx, project, file_id)
