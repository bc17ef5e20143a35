"""FastAPI dependencies, as ``Annotated`` aliases the routers use."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from .contracts import ArtifactStore, Dispatcher, JobRecord, JobStore, Settings, valid_job_id

__all__ = [
    "get_settings",
    "SettingsDep",
    "ServiceState",
    "StateDep",
    "get_owner",
    "OwnerDep",
    "load_job",
]


@lru_cache
def get_settings() -> Settings:
    """Settings from the environment, read once. Tests override this dependency."""
    return Settings()


SettingsDep = Annotated[Settings, Depends(get_settings)]


@dataclass
class ServiceState:
    """What the app builds at startup from its settings (see ``service.app``)."""

    settings: Settings
    store: JobStore
    artifacts: ArtifactStore
    dispatcher: Dispatcher
    embedded: object | None = None  # the EmbeddedRunner in embedded mode


def _state(request: Request) -> ServiceState:
    return request.app.state.svc


StateDep = Annotated[ServiceState, Depends(_state)]


def get_owner() -> str:
    """Who is calling. One shared owner until API keys arrive; records already carry it,
    so listing and access checks need no change when this returns a tenant."""
    return "anonymous"


OwnerDep = Annotated[str, Depends(get_owner)]


def load_job(state: ServiceState, owner: str, job_id: str) -> JobRecord:
    """The caller's job, or 404. Someone else's job is reported as missing, not forbidden."""
    rec = state.store.get(job_id) if valid_job_id(job_id) else None
    if rec is None or rec.owner != owner:
        raise HTTPException(404, f"no job with id {job_id!r}")
    return rec
