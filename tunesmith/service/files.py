"""Uploaded files: stored once by content (``files/<sha[:2]>/<sha>``), one row per upload.

A fine-tune file small enough is validated by the data layer when it arrives, so bad
data fails the upload with line-numbered messages; larger ones are validated when a
job uses them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Connection

from tunesmith.service import db
from tunesmith.service.context import ServiceContext
from tunesmith.service.errors import APIError, bad_request, conflict, not_found
from tunesmith.service.ids import new_id
from tunesmith.service.pagination import check_limit, list_object, page
from tunesmith.service.projects import Project
from tunesmith.service.uploads import Upload

UPLOAD_PURPOSES = ("fine-tune", "batch", "user_data", "assistants", "vision")
RESULTS_PURPOSE = "fine-tune-results"
ACTIVE_JOB_STATUSES = ("validating_files", "queued", "running", "paused")


def blob_path(ctx: ServiceContext, sha256: str) -> Path:
    """Where the content with this digest is kept."""
    return ctx.settings.files_dir / sha256[:2] / sha256


def incoming_dir(ctx: ServiceContext) -> Path:
    """Where uploads are streamed before they are checked and moved into place."""
    return ctx.settings.files_dir / ".incoming"


def public(row) -> dict:
    """The OpenAI ``file`` object for a row."""
    return {"id": row.id, "object": "file", "bytes": row.bytes, "created_at": row.created_at,
            "filename": row.filename, "purpose": row.purpose, "status": row.status,
            "status_details": row.status_details, "expires_at": None}


def data_problems(path: Path, filename: str, model: str | Path | None = None) -> list[str]:
    """The data layer's errors for a training file (empty when it is usable).

    Args:
        path: the file on disk.
        filename: the name the user knows it by, used in each message.
        model: the model whose tokenizer and chat template render the examples (default: the default base).
    """
    from tunesmith.data import check_file
    from tunesmith.errors import DataError
    from tunesmith.models.registry import DEFAULT_MODEL

    try:
        report = check_file(path, model=str(model) if model is not None else DEFAULT_MODEL, name=filename)
    except DataError as exc:
        return [exc.message, *[p for p in exc.problems if p != exc.message]]
    return [] if report.ok else [str(e) for e in report.errors]


def problems_message(filename: str, problems: list[str], limit: int = 20) -> str:
    """One message listing the line-numbered problems of a training file."""
    shown = "\n".join(f"  {p}" for p in problems[:limit])
    more = f"\n  … and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"Invalid file format for fine-tuning: {filename} has {len(problems)} problem(s):\n{shown}{more}"


def store_upload(ctx: ServiceContext, project: Project, upload: Upload) -> dict:
    """Check an upload's purpose (and data, for fine-tune files) and keep it.

    Raises:
        APIError: 400 for a bad purpose or bad training data (the file is not kept).
    """
    try:
        purpose = upload.fields.get("purpose")
        if purpose is None:
            raise bad_request("Missing required parameter: 'purpose'.", param="purpose")
        if purpose not in UPLOAD_PURPOSES:
            raise bad_request(f"Invalid purpose {purpose!r}: use one of {', '.join(UPLOAD_PURPOSES)}.",
                              param="purpose")
        if purpose == "fine-tune" and upload.size <= ctx.settings.validate_upload_max_bytes:
            problems = data_problems(upload.path, upload.filename)
            if problems:
                raise bad_request(problems_message(upload.filename, problems), param="file",
                                  code="invalid_file_format")
        target = blob_path(ctx, upload.sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            upload.path.unlink()
        else:
            os.replace(upload.path, target)
    except BaseException:
        if upload.path is not None:
            upload.path.unlink(missing_ok=True)
        raise
    return add_file(ctx, project, filename=upload.filename, purpose=purpose, sha256=upload.sha256,
                    size=upload.size)


def add_file(ctx: ServiceContext, project: Project, *, filename: str, purpose: str, sha256: str,
             size: int) -> dict:
    """Insert the row of a file whose content is already in place; returns its public object."""
    file_id = new_id("file")
    with ctx.engine.begin() as conn:
        conn.execute(insert(db.files).values(id=file_id, project_id=project.id, filename=filename,
                                             purpose=purpose, bytes=size, sha256=sha256, status="processed",
                                             status_details=None, created_at=db.now()))
        return public(get_row(conn, project, file_id))


def add_local_file(ctx: ServiceContext, project_id: str, source: Path, *, filename: str, purpose: str) -> str:
    """Copy a file the server made (a job's metrics CSV) into the store; returns its id."""
    import hashlib

    digest = hashlib.sha256()
    with open(source, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    sha = digest.hexdigest()
    target = blob_path(ctx, sha)
    if not target.exists():
        from tunesmith.atomic import atomic_file

        with atomic_file(target, "wb") as out, open(source, "rb") as handle:
            shutil.copyfileobj(handle, out)
    file_id = new_id("file")
    with ctx.engine.begin() as conn:
        conn.execute(insert(db.files).values(id=file_id, project_id=project_id, filename=filename, purpose=purpose,
                                             bytes=target.stat().st_size, sha256=sha, status="processed",
                                             status_details=None, created_at=db.now()))
    return file_id


def get_row(conn: Connection, project: Project, file_id: str, param: str | None = None):
    """The project's file row; 404 when unknown or another project's."""
    row = conn.execute(select(db.files).where(db.files.c.id == file_id)
                       .where(db.files.c.project_id == project.id)).first()
    if row is None:
        raise not_found("file", file_id, param=param)
    return row


def retrieve(ctx: ServiceContext, project: Project, file_id: str) -> dict:
    """The public object of one file."""
    with ctx.engine.connect() as conn:
        return public(get_row(conn, project, file_id))


def list_files(ctx: ServiceContext, project: Project, *, after: str | None, limit: int | None,
               order: str | None, purpose: str | None) -> dict:
    """A page of the project's files (newest first unless ``order=asc``)."""
    if order not in (None, "asc", "desc"):
        raise bad_request(f"order must be 'asc' or 'desc', got {order!r}.", param="order")
    query = select(db.files).where(db.files.c.project_id == project.id)
    if purpose is not None:
        query = query.where(db.files.c.purpose == purpose)
    with ctx.engine.connect() as conn:
        rows, more = page(conn, db.files, query, after=after, limit=check_limit(limit, 10_000),
                          newest_first=order != "asc", kind="file")
    return list_object([public(r) for r in rows], more)


def content_path(ctx: ServiceContext, project: Project, file_id: str) -> tuple[Path, str]:
    """The stored content of a file and its name, for download."""
    with ctx.engine.connect() as conn:
        row = get_row(conn, project, file_id)
    path = blob_path(ctx, row.sha256)
    if not path.is_file():
        raise APIError(404, f"The content of file '{file_id}' is missing from the server's store.",
                       code="file_content_missing")
    return path, row.filename


def remove(ctx: ServiceContext, project: Project, file_id: str) -> dict:
    """Delete a file (its content too once no other upload shares it).

    Raises:
        APIError: 404 unknown, 409 while an unfinished job trains on it.
    """
    with ctx.engine.begin() as conn:
        row = get_row(conn, project, file_id)
        in_use = conn.execute(
            select(db.jobs.c.id).where(db.jobs.c.status.in_(ACTIVE_JOB_STATUSES))
            .where((db.jobs.c.training_file == file_id) | (db.jobs.c.validation_file == file_id))).first()
        if in_use is not None:
            raise conflict(f"File '{file_id}' is used by fine-tuning job '{in_use.id}', which has not finished; "
                           "cancel the job or wait for it first.", code="file_in_use")
        conn.execute(delete(db.files).where(db.files.c.id == file_id))
        shared = conn.execute(select(db.files.c.id).where(db.files.c.sha256 == row.sha256)).first()
    if shared is None:
        blob_path(ctx, row.sha256).unlink(missing_ok=True)
    return {"id": file_id, "object": "file", "deleted": True}


def path_of(conn: Connection, ctx: ServiceContext, project_id: str, file_id: str) -> Path:
    """The content path of a file by id, for the worker (no project check: the job row already did)."""
    row = conn.execute(select(db.files).where(db.files.c.id == file_id)
                       .where(db.files.c.project_id == project_id)).first()
    if row is None:
        raise not_found("file", file_id)
    return blob_path(ctx, row.sha256)
