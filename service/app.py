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
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from congeal import __version__

from .contracts import ArtifactStore, CeleryDispatcher, Settings, open_dataset_store, open_store
from .datasets import DatasetChecker
from .deps import ServiceState, get_settings
from .metrics import CONTENT_TYPE_LATEST, RequestMiddleware, ServiceMetrics
from .routers import datasets, health, jobs, models, pairs, points, results, ui
from .schemas import AUTH_ERRORS, SERVER_ERRORS
from .uploads import UploadGate

__all__ = ["create_app", "app", "check_access", "access_problem", "AccessConfigError"]

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


class AccessConfigError(RuntimeError):
    """No API keys configured, and open access was not asked for."""


def access_problem(settings: Settings) -> str | None:
    """Why this configuration must not serve, in one line; None when it may."""
    if settings.api_key_hashes or settings.allow_open:
        return None
    return ("no API keys: set CONGEAL_API_KEYS to 'tenant:<sha256 hex of the key>,...' (docs/service.md, "
            "'API keys and tenants'), or serve everyone as 'anonymous' with CONGEAL_ALLOW_OPEN=true "
            "('congeal serve --open')")


def check_access(settings: Settings) -> None:
    """Refuse to serve without keys unless open access was asked for; say so loudly when open."""
    if settings.api_key_hashes:
        log.info("congeal API: %d API key(s) configured", len(settings.api_key_hashes))
        return
    problem = access_problem(settings)
    if problem is not None:
        raise AccessConfigError(problem)
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
        metrics.attach(state)
        log.info("congeal API: %s mode, artifacts in %s", "embedded" if s.embedded else "redis", state.artifacts.root)
        try:
            yield
        finally:
            metrics.close()
            state.checker.close()
            state.datasets.close()
            if state.embedded is not None:
                state.embedded.close()
            else:
                state.dispatcher.close()
            state.store.close()

    # docs_url/redoc_url None: FastAPI's own pages load their scripts from a CDN (blank offline);
    # ours below are served from service/static/docs.
    app = FastAPI(title="congeal", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    if settings is not None:
        app.dependency_overrides[get_settings] = lambda: settings
    for r in (jobs.router, results.router, datasets.router, models.router, pairs.router, points.router):
        app.include_router(r, responses={**AUTH_ERRORS, **SERVER_ERRORS})
    app.include_router(health.router, responses=SERVER_ERRORS)
    app.include_router(ui.router)
    _mount_docs(app)
    metrics = ServiceMetrics()
    app.add_middleware(RequestMiddleware, metrics=metrics)

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        """Prometheus text format; no key (aggregates only). See service.metrics."""
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

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


STATIC = Path(__file__).resolve().parent / "static"


def _mount_docs(app: FastAPI) -> None:
    """``/docs`` (Swagger UI) and ``/redoc`` from the package's own copies of their files
    (service/static/docs/NOTICE.md): they work with no network."""
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def urls(request: Request) -> tuple[str, str]:
        root = request.scope.get("root_path", "").rstrip("/")  # behind a proxy that strips a prefix
        return root + app.openapi_url, root + "/static/docs"

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        openapi, assets = urls(request)
        return get_swagger_ui_html(
            openapi_url=openapi, title="congeal API", swagger_js_url=f"{assets}/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url=f"{assets}/swagger-ui/swagger-ui.css",
            swagger_favicon_url=f"{assets}/swagger-ui/favicon-32x32.png",
            # validatorUrl None: no badge fetched from swagger.io.
            swagger_ui_parameters={"validatorUrl": None, "tryItOutEnabled": True})

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        openapi, assets = urls(request)
        return get_redoc_html(openapi_url=openapi, title="congeal API", redoc_js_url=f"{assets}/redoc/redoc.standalone.js",
                              redoc_favicon_url=f"{assets}/swagger-ui/favicon-32x32.png", with_google_fonts=False)


def _is_store_outage(exc: Exception) -> bool:
    try:
        import redis
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError))


app = create_app()
