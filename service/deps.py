"""FastAPI dependencies, as ``Annotated`` aliases the routers use."""
from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from .contracts import ArtifactStore, DatasetStore, Dispatcher, JobRecord, JobStore, Settings, valid_job_id

__all__ = [
    "PAGE_OFFSET_MAX",
    "check_page_limit",
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
    datasets: DatasetStore | None = None
    checker: object | None = None  # the DatasetChecker (service.datasets)
    upload_gate: object | None = None  # service.uploads.UploadGate: upload checks at once, decode memory


def _state(request: Request) -> ServiceState:
    return request.app.state.svc


StateDep = Annotated[ServiceState, Depends(_state)]


ANONYMOUS = "anonymous"
_RATE_WINDOW_S = 60


# Declared as security schemes, so the OpenAPI document says how to authenticate and /docs has an
# "Authorize" button. auto_error=False: get_owner decides (no keys configured: everyone is anonymous).
bearer_scheme = HTTPBearer(auto_error=False, scheme_name="bearer",
                           description="an API key the operator gave you: 'Authorization: Bearer <key>'")
api_key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="apiKey",
                              description="the same API key, in this header instead")


def _presented_key(request: Request, bearer: HTTPAuthorizationCredentials | None, header: str | None) -> str | None:
    if request.headers.get("authorization"):
        # An Authorization header wins; one that is not a bearer token carries no key.
        return (bearer.credentials.strip() or None) if bearer is not None else None
    return header or None


def authenticate(settings: Settings, presented: str | None) -> str | None:
    """The tenant whose key this is, or None. Every configured hash is compared, in
    constant time, so timing says nothing about which tenant or how much matched."""
    digest = hashlib.sha256(presented.encode()).hexdigest() if presented else "-" * 64
    found = None
    for tenant, want in settings.api_key_hashes:
        if hmac.compare_digest(digest, want) and found is None:
            found = tenant
    return found


def _unauthorized(msg: str) -> HTTPException:
    return HTTPException(401, msg, headers={"WWW-Authenticate": 'Bearer realm="congeal"'})


async def get_owner(request: Request, state: StateDep,
                    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
                    header: Annotated[str | None, Depends(api_key_scheme)]) -> str:
    """Who is calling: the tenant of the API key (``Authorization: Bearer <key>`` or
    ``X-API-Key``), 401 without a valid one. With no keys configured (the service then runs
    only with ``allow_open``) everyone is ``anonymous``. Each call also counts against the tenant's
    request rate: 429 with ``Retry-After`` above ``rate_limit_per_minute``."""
    s = state.settings
    if s.api_key_hashes:
        presented = _presented_key(request, bearer, header)
        if presented is None:
            raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        owner = authenticate(s, presented)
        if owner is None:
            raise _unauthorized("invalid API key")
    else:
        owner = ANONYMOUS
    request.state.tenant = owner  # for the request's log line
    if s.rate_limit_per_minute:
        ok, wait_s = await run_in_threadpool(state.store.hit, f"req:{owner}", s.rate_limit_per_minute,
                                             _RATE_WINDOW_S)
        if not ok:
            raise HTTPException(429, f"rate limit of {s.rate_limit_per_minute} requests per minute exceeded",
                                headers={"Retry-After": str(max(1, math.ceil(wait_s)))})
    return owner


OwnerDep = Annotated[str, Depends(get_owner)]


def load_job(state: ServiceState, owner: str, job_id: str) -> JobRecord:
    """The caller's job, or 404. Someone else's job is reported as missing, not forbidden."""
    rec = state.store.get(job_id) if valid_job_id(job_id) else None
    if rec is None or rec.owner != owner:
        raise HTTPException(404, f"no job with id {job_id!r}")
    return rec


# Offsets beyond any real collection are still answered (an empty page), never passed on unbounded.
PAGE_OFFSET_MAX = 2**62


def check_page_limit(limit: int, maximum: int) -> None:
    """A 422 in FastAPI's own shape when a page asks for more than ``maximum`` rows."""
    if limit > maximum:
        raise HTTPException(422, [{"type": "less_than_equal", "loc": ["query", "limit"], "msg": f"at most {maximum}"}])
