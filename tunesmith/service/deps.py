"""Typed dependencies shared by the routes: the service context and the caller's project."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from tunesmith.service.context import ServiceContext
from tunesmith.service.errors import APIError
from tunesmith.service.projects import Project, authenticate


def get_ctx(request: Request) -> ServiceContext:
    """The app's settings and database."""
    return request.app.state.ctx


def _redacted(key: str) -> str:
    return f"{key[:6]}…{key[-4:]}" if len(key) > 12 else "…"


async def current_project(request: Request) -> Project:
    """The project the bearer key opens; 401 for a missing, unknown or revoked key."""
    header = request.headers.get("authorization")
    if header is None or not header.strip():
        raise APIError(401, "You didn't provide an API key. Send it in the Authorization header as "
                            "'Bearer sk-…' (the openai client's api_key).", code="missing_api_key")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "The Authorization header must be 'Bearer <key>'.", code="invalid_api_key")
    ctx = request.app.state.ctx
    project = await run_in_threadpool(authenticate, ctx.engine, ctx.settings, token)
    if project is None:
        raise APIError(401, f"Incorrect API key provided: {_redacted(token)}. Make one with "
                            "`tunesmith keys create --project NAME`.", code="invalid_api_key")
    return project


Ctx = Annotated[ServiceContext, Depends(get_ctx)]
CurrentProject = Annotated[Project, Depends(current_project)]
