"""The FastAPI application: ``uvicorn service.app:app`` or ``congeal serve``.

With ``CONGEAL_REDIS_URL`` set, jobs are recorded in Redis and sent to Celery
workers by task name. Without it the same API runs in embedded mode
(``service.embedded``): SQLite job store, jobs run by in-process threads.
Either way this process never imports torch.
"""
from __future__ import annotations

import logging
import sys
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from .contracts import ArtifactStore, CeleryDispatcher, Settings, open_dataset_store, open_store
from .datasets import DatasetChecker
from .deps import ServiceState, get_settings
from .routers import datasets, health, jobs, models, results
from .uploads import UploadGate

__all__ = ["create_app", "app"]

log = logging.getLogger("congeal.api")

DESCRIPTION = """\
Joint image alignment ("congealing") as a service. Upload a collection with
`POST /jobs`, poll `GET /jobs/{id}` for progress, then download the per-image
transforms, the aligned images and the mean/variance images. A succeeded job's
trained model aligns new images with `POST /models/{id}/align`. Large collections
are uploaded once, in resumable chunks, as a dataset (`POST /datasets`) that jobs
name; their per-image results page through `GET /jobs/{id}/per-image`. `POST /pairs` estimates
the homography between two images (or many pairs) as a job; see docs/pairwise.md.
See docs/service.md for the full guide.
"""


def check_access(settings: Settings) -> None:
    """Refuse to serve a shared deployment without keys; say so loudly when open."""
    if settings.api_key_hashes:
        log.info("congeal API: %d API key(s) configured", len(settings.api_key_hashes))
        return
    if not settings.embedded and not settings.allow_open:
        raise RuntimeError("CONGEAL_API_KEYS is not set: a Redis-backed deployment needs API keys "
                           "(or CONGEAL_ALLOW_OPEN=true to serve everyone as 'anonymous'); see docs/service.md")
    # stderr as well as the log: uvicorn does not show this logger by default, and this must be seen.
    msg = ("congeal API: OPEN ACCESS - no API keys configured (CONGEAL_API_KEYS); every caller is "
           "'anonymous' and sees every job. Fine on localhost, not on a network.")
    log.warning(msg)
    print(msg, file=sys.stderr, flush=True)


def build_state(settings: Settings) -> ServiceState:
    check_access(settings)
    store = open_store(settings)
    artifacts = ArtifactStore(settings.data_dir)
    artifacts.root.mkdir(parents=True, exist_ok=True)
    ds = open_dataset_store(settings)
    checker = DatasetChecker(ds, artifacts, settings)
    gate = UploadGate(settings.upload_check_memory_bytes, settings.max_upload_checks_per_key)
    if settings.embedded:
        from .embedded import EmbeddedRunner

        runner = EmbeddedRunner(store, artifacts, settings).start()
        return ServiceState(settings, store, artifacts, runner, embedded=runner, datasets=ds, checker=checker,
                            upload_gate=gate)
    return ServiceState(settings, store, artifacts, CeleryDispatcher(settings), datasets=ds, checker=checker,
                        upload_gate=gate)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app. ``settings`` (tests, ``congeal serve``) override ``get_settings()`` for
    the app's lifetime; without them the environment is read at startup."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        s = app.dependency_overrides.get(get_settings, get_settings)()
        state = build_state(s)
        app.state.svc = state
        log.info("congeal API: %s mode, artifacts in %s", "embedded" if s.embedded else "redis", state.artifacts.root)
        try:
            yield
        finally:
            state.checker.close()
            state.datasets.close()
            if state.embedded is not None:
                state.embedded.close()
            else:
                state.dispatcher.close()
            state.store.close()

    app = FastAPI(title="congeal", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    if settings is not None:
        app.dependency_overrides[get_settings] = lambda: settings
    app.include_router(jobs.router)
    app.include_router(results.router)
    app.include_router(datasets.router)
    app.include_router(models.router)
    app.include_router(health.router)
    # --- pairwise alignment (models/pairwise; issue 17)
    from .routers import pairs

    app.include_router(pairs.router)
    # --- end pairwise

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Still JSON, still an id to find the traceback by; bad input never ends up here.
        error_id = uuid.uuid4().hex[:12]
        log.error("unhandled error %s on %s %s", error_id, request.method, request.url.path, exc_info=exc)
        if _is_store_outage(exc):
            return JSONResponse({"detail": "the job store is unreachable; try again shortly", "error_id": error_id},
                                status_code=503)
        return JSONResponse({"detail": "internal server error", "error_id": error_id}, status_code=500)

    return app


def _is_store_outage(exc: Exception) -> bool:
    try:
        import redis
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError))


app = create_app()
