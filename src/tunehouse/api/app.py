"""The app factory: create_app(settings) builds a server with its own home, database and worker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from tunehouse import __version__, ids
from tunehouse.api.aliases.router import router as aliases_router
from tunehouse.api.base_models.router import router as base_models_router
from tunehouse.api.batches.router import router as batches_router
from tunehouse.api.chat.router import router as chat_router
from tunehouse.api.completions.router import router as completions_router
from tunehouse.api.dashboard.router import pages as dashboard_pages
from tunehouse.api.dashboard.router import router as dashboard_router
from tunehouse.api.deps import OrgDep
from tunehouse.api.errors import install_error_handlers
from tunehouse.api.evals.router import router as evals_router
from tunehouse.api.files.router import router as files_router
from tunehouse.api.fine_tuning.router import router as fine_tuning_router
from tunehouse.api.graders.router import router as graders_router
from tunehouse.api.middleware.json_guard import JsonBodyGuard
from tunehouse.api.middleware.ratelimit import RateLimitMiddleware
from tunehouse.api.models.router import router as models_router
from tunehouse.api.organization.router import permissions_router
from tunehouse.api.organization.router import router as organization_router
from tunehouse.api.responses.router import router as responses_router
from tunehouse.api.state import AppState
from tunehouse.api.uploads import service as uploads_service
from tunehouse.api.uploads.router import router as uploads_router
from tunehouse.api.usage.router import router as usage_router
from tunehouse.config import Settings
from tunehouse.jobs.worker import Worker
from tunehouse.webhooks.delivery import WebhookSender

log = logging.getLogger(__name__)

# Expired uploads' parts are swept at start and this often (and before each /v1/uploads request).
UPLOAD_SWEEP_SECONDS = 600.0


async def _sweep_uploads(state: AppState) -> None:
    """Abandoned uploads expire an hour after they are made: their parts' bytes go (in a thread:
    the sweep touches the database and the store)."""
    while True:
        await asyncio.to_thread(uploads_service.sweep, state)
        await asyncio.sleep(UPLOAD_SWEEP_SECONDS)


def create_app(settings: Settings | None = None, *, start_worker: bool | None = None) -> FastAPI:
    settings = settings or Settings()
    state = AppState.open(settings)
    run_worker = settings.local_worker if start_worker is None else start_worker

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker = None
        if run_worker:
            worker = Worker(settings, db=state.db)
            worker.start()
        # Webhook deliveries wait in a table (webhooks/outbox.py); this sends them, with retries.
        sender = WebhookSender(settings, state.db)
        sender.start()
        sweeper = asyncio.create_task(_sweep_uploads(state))
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            sender.stop()
            if worker is not None:
                worker.stop()
            state.close()

    # No unauthenticated /docs or /redoc (Swagger's pages load from a CDN anyway); the schema
    # answers only with a key, like the rest of the API.
    app = FastAPI(
        title="tunehouse",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.tunehouse = state
    install_error_handlers(app)
    # Middleware runs outside-in in the reverse order of adding: request id, then the JSON body
    # guard (a too large or too deeply nested body is refused before anything parses it), then the
    # per-key rate limits (x-ratelimit-* headers on every authenticated /v1 response).
    app.add_middleware(RateLimitMiddleware, state=state)
    app.add_middleware(JsonBodyGuard)

    @app.middleware("http")
    async def request_id(request: Request, call_next):
        response = await call_next(request)
        response.headers["x-request-id"] = ids.request_id()
        return response

    for router in (
        files_router,
        uploads_router,
        fine_tuning_router,
        graders_router,
        models_router,
        chat_router,
        completions_router,
        responses_router,
        usage_router,
        aliases_router,
        base_models_router,
        organization_router,
        permissions_router,
        evals_router,
        batches_router,
        dashboard_router,
        dashboard_pages,
    ):
        app.include_router(router)

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(principal: OrgDep) -> dict:
        return app.openapi()

    @app.get("/health", include_in_schema=False)
    def health() -> dict:
        return {"status": "ok", "version": __version__}

    return app
