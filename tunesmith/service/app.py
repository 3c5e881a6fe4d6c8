"""The FastAPI application: routes, error handlers, and what lives for the server's lifetime."""

from __future__ import annotations

import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor

import anyio
from fastapi import FastAPI

from tunesmith import __version__
from tunesmith.service import jobs
from tunesmith.service.context import ServiceContext
from tunesmith.service.errors import install_handlers
from tunesmith.service.inference import EngineHolder, Inference
from tunesmith.service.routes import completions, files, jobs as job_routes, models

log = logging.getLogger("tunesmith.service")


def create_app(ctx: ServiceContext | None = None) -> FastAPI:
    """Build the API app.

    Args:
        ctx: settings and database (default: read from the environment).
    """
    ctx = ctx or ServiceContext.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        pending = jobs.revalidate_pending(ctx, app.state.validator)
        if pending:
            log.info("validating the files of %d job(s) left from before", pending)
        yield
        app.state.validator.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="tunesmith", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible fine-tuning API: files, fine-tuning jobs, models, completions.")
    app.state.ctx = ctx
    # One thread validates job files in order, off the request path (a job answers in validating_files).
    app.state.validator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunesmith-validate")
    app.state.inference = Inference(ctx, EngineHolder(ctx.settings.device))
    app.state.inference_limiter = anyio.CapacityLimiter(ctx.settings.inference_threads)
    install_handlers(app)
    for module in (files, job_routes, models, completions):
        app.include_router(module.router)

    @app.get("/health", include_in_schema=False)
    def health() -> dict:
        return {"status": "ok", "version": __version__}

    return app
