"""``/healthz`` (the process answers) and ``/readyz`` (it can do work)."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..deps import StateDep
from ..schemas import HealthPublic, ReadyPublic

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthPublic, summary="Liveness: the API process is up")
def healthz() -> HealthPublic:
    return HealthPublic()


@router.get("/readyz", response_model=ReadyPublic, summary="Readiness: job store and at least one worker reachable",
            responses={503: {"model": ReadyPublic}})
def readyz(state: StateDep):
    mode = "embedded" if state.embedded is not None else "redis"
    store = type(state.store).__name__
    try:
        state.store.ping()
        workers = sorted(w.get("name", "?") for w in state.store.live_workers())
    except Exception as e:
        body = ReadyPublic(status="not ready", mode=mode, store=store, workers=[],
                           detail=f"job store unreachable: {type(e).__name__}: {e}")
        return JSONResponse(body.model_dump(), status_code=503)
    if not workers:
        detail = ("no worker has sent a heartbeat recently; start one with "
                  "'celery -A worker.app worker' (see docs/service.md)")
        return JSONResponse(ReadyPublic(status="not ready", mode=mode, store=store, workers=[],
                                        detail=detail).model_dump(), status_code=503)
    return ReadyPublic(status="ready", mode=mode, store=store, workers=workers)
