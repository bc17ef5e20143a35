"""``/jobs``: create alignment jobs, follow them, cancel them, download their results."""
from __future__ import annotations

import json
import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from models.report import CSP as REPORT_CSP
from models.report import REPORT_FILE

from ..contracts import RESULT_IMAGES, JobKind, JobRecord, JobStatus
from ..execution import purge
from ..deps import OwnerDep, ServiceState, StateDep, check_page_limit, load_job
from ..jobs import accept_job, multipart_openapi, to_public
from ..schemas import ErrorPublic, JobCreate, JobPublic, JobsPublic

__all__ = ["router", "dispatch_new", "finished_job", "replayed", "IdempotencyKey"]

log = logging.getLogger("congeal.api")
router = APIRouter(prefix="/jobs", tags=["jobs"])

_ERRORS = {
    400: {"model": ErrorPublic, "description": "malformed request body"},
    404: {"model": ErrorPublic, "description": "no such job"},
    413: {"model": ErrorPublic, "description": "upload, image or collection above a limit"},
    415: {"model": ErrorPublic, "description": "not multipart/form-data"},
    422: {"model": ErrorPublic, "description": "bad file or option; the message names it"},
}
# Far beyond any tenant's job count; bounded so no store is asked for a page past 2**63.
MAX_OFFSET = 10**9
IdempotencyKey = Annotated[str | None, Header(
    min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$",
    description="repeat a request with the same key to get the same job back instead of a second one")]


async def replayed(state: ServiceState, owner: str, key: str | None, kind: JobKind,
                   model_id: str | None = None) -> JobRecord | None:
    """The job an earlier request with this idempotency key created, if any.

    A key reused for a different kind of request is an error, not a silent replay.
    """
    if not key:
        return None
    prior = await run_in_threadpool(state.store.find_idempotent, owner, key)
    if prior is not None and (prior.kind != kind or prior.model_id != model_id):
        raise HTTPException(422, [{"type": "idempotency_key_reused", "loc": ["header", "idempotency-key"],
                                   "msg": f"this key was used for another request (job {prior.id})"}])
    return prior


def dispatch_new(state: ServiceState, rec: JobRecord) -> None:
    """Hand a new job to the workers. If the broker is unreachable the job stays queued
    with no send time, and a worker's reconciler sends it once things are back."""
    try:
        state.dispatcher.dispatch(rec)
    except Exception:
        log.exception("job %s: could not send its task now; the reconciler will", rec.id)
        return
    state.store.mark_enqueued(rec.id)


@router.post(
    "", status_code=202, response_model=JobPublic, name="create_job",
    summary="Upload a collection and start aligning it",
    responses={**_ERRORS, 202: {"description": "accepted; poll the job's 'self' link",
                                "headers": {"Location": {"schema": {"type": "string"}},
                                            "Idempotent-Replayed": {"schema": {"type": "string"}}}}},
    openapi_extra=multipart_openapi(JobCreate, "the images (PNG, JPEG, TIFF, BMP), or one .zip/.tar[.gz] "
                                               "archive of them, or one .npy array; at least 2 images"),
)
async def create_job(request: Request, response: Response, state: StateDep, owner: OwnerDep,
                     idempotency_key: IdempotencyKey = None) -> JobPublic:
    """Multipart upload of the images plus the job options as form fields. The body is
    streamed to the artifact store and every image is checked before the job is queued;
    the answer comes at once with the job's id and links."""
    prior = await replayed(state, owner, idempotency_key, JobKind.align)
    if prior is not None:
        return _accepted(request, response, prior, replayed=True)
    rec, created = await accept_job(request, state, owner, kind=JobKind.align, options_model=JobCreate,
                                    min_images=2, idempotency_key=idempotency_key)
    if created:
        await run_in_threadpool(dispatch_new, state, rec)
        rec = await run_in_threadpool(state.store.get, rec.id) or rec
    return _accepted(request, response, rec, replayed=not created)


def _accepted(request: Request, response: Response, rec: JobRecord, replayed: bool) -> JobPublic:
    pub = to_public(rec, request)
    response.headers["Location"] = pub.links.self
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return pub


@router.get("", response_model=JobsPublic, name="list_jobs", summary="The caller's jobs, newest first")
def list_jobs(request: Request, state: StateDep, owner: OwnerDep,
              offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
              limit: Annotated[int, Query(ge=1, description="page size (at most the service's page_size_max)")] = 20
              ) -> JobsPublic:
    check_page_limit(limit, state.settings.page_size_max)
    recs, total = state.store.list(owner, offset, limit)
    nxt = None
    if offset + len(recs) < total:
        nxt = f"{request.app.url_path_for('list_jobs')}?offset={offset + limit}&limit={limit}"
    return JobsPublic(data=[to_public(r, request) for r in recs], total=total, offset=offset, limit=limit, next=nxt)


@router.get("/{job_id}", response_model=JobPublic, name="get_job", responses={404: _ERRORS[404]},
            summary="Status, progress, timestamps, error or metrics, and result links")
def get_job(job_id: str, request: Request, state: StateDep, owner: OwnerDep) -> JobPublic:
    return to_public(load_job(state, owner, job_id), request)


@router.delete("/{job_id}", status_code=202, response_model=JobPublic, name="cancel_job",
               responses={204: {"description": "the job had ended: its record and every file are deleted"},
                          404: _ERRORS[404]},
               summary="Cancel a queued or running job; delete a finished one")
def cancel_job(job_id: str, request: Request, state: StateDep, owner: OwnerDep):
    """A queued job is cancelled at once. A running one is flagged: its worker stops the
    training process within seconds and the status turns ``cancelled`` (202 either way).
    A job that has already ended (succeeded, failed or cancelled) is purged: its uploads,
    results and model are deleted with its record, and it answers 204; afterwards it is 404."""
    load_job(state, owner, job_id)
    rec, changed = state.store.request_cancel(job_id)
    if rec is None:
        raise HTTPException(404, f"no job with id {job_id!r}")
    if not changed and rec.terminal:
        purge(state.store, state.artifacts, job_id)
        return Response(status_code=204)
    return to_public(rec, request)


# ---------------------------------------------------------------------- results


def finished_job(state: ServiceState, owner: str, job_id: str) -> JobRecord:
    rec = load_job(state, owner, job_id)
    if rec.status != JobStatus.succeeded:
        raise HTTPException(409, f"job {job_id} is {rec.status.value}; results exist once it has succeeded")
    return rec


def _file(path, media_type: str, filename: str | None = None) -> FileResponse:
    if not path.is_file():
        raise HTTPException(404, f"{path.name} is missing from the artifact store")
    return FileResponse(path, media_type=media_type, filename=filename)


_DL = {404: _ERRORS[404], 409: {"model": ErrorPublic, "description": "the job has not succeeded"}}


@router.get("/{job_id}/transforms", name="download_transforms", responses=_DL,
            response_class=FileResponse, summary="Per-image 3x3 transforms (JSON)")
def download_transforms(job_id: str, state: StateDep, owner: OwnerDep):
    """``{"convention": ..., "output_size": [H, W], "images": [{"name", "aligned_file", "input_size",
    "matrix", "fill"}]}``. ``matrix`` maps an aligned-output pixel to an input pixel; the
    convention string says exactly how."""
    finished_job(state, owner, job_id)
    return _file(state.artifacts.result_file(job_id, "transforms.json"), "application/json")


@router.get("/{job_id}/metrics", name="download_metrics", responses=_DL, response_class=FileResponse,
            summary="Full metrics, including per-image residuals (JSON)")
def download_metrics(job_id: str, state: StateDep, owner: OwnerDep):
    finished_job(state, owner, job_id)
    return _file(state.artifacts.result_file(job_id, "metrics.json"), "application/json")


@router.get("/{job_id}/report", name="download_report", responses=_DL, response_class=FileResponse,
            summary="The job's report: one self-contained HTML page (models/report.py) to open in a browser")
def download_report(job_id: str, state: StateDep, owner: OwnerDep):
    """Checks and warnings in words, mean and variance before and after, the training curve and
    a contact sheet of inputs beside their aligned images, worst residual first. Every image is
    inlined; the page loads nothing and runs no script (its Content-Security-Policy says so)."""
    finished_job(state, owner, job_id)
    resp = _file(state.artifacts.result_file(job_id, REPORT_FILE), "text/html; charset=utf-8")
    resp.headers["Content-Security-Policy"] = REPORT_CSP
    return resp


@router.get("/{job_id}/aligned.zip", name="download_aligned_zip", responses=_DL, response_class=FileResponse,
            summary="All aligned images and transforms.json in one zip")
def download_aligned_zip(job_id: str, state: StateDep, owner: OwnerDep):
    finished_job(state, owner, job_id)
    return _file(state.artifacts.aligned_zip(job_id), "application/zip", filename=f"aligned-{job_id}.zip")


@router.get("/{job_id}/aligned/{name:path}", name="download_aligned_image", responses=_DL,
            response_class=FileResponse, summary="One aligned image (PNG), by its input name")
def download_aligned_image(job_id: str, name: str, state: StateDep, owner: OwnerDep):
    """``name`` is the input image's name as uploaded (``a/b.jpg`` inside an archive), or the
    aligned file's name. It is looked up in the job's transforms, never used as a path."""
    finished_job(state, owner, job_id)
    out = state.artifacts.output_dir(job_id)
    try:
        images = json.loads((out / "transforms.json").read_text())["images"]
    except (OSError, ValueError, KeyError):
        raise HTTPException(404, "transforms.json is missing from the artifact store") from None
    for im in images:
        if name in (im["name"], im["aligned_file"], im["aligned_file"].removeprefix("aligned/")):
            path = (out / im["aligned_file"]).resolve()
            if out.resolve() not in path.parents:  # a hand-edited transforms.json must not leak files
                break
            return _file(path, "image/png")
    raise HTTPException(404, f"job {job_id} has no image named {name!r}")


@router.get("/{job_id}/images/{image}", name="download_result_image", responses=_DL,
            response_class=FileResponse, summary="Mean or variance image, before or after alignment (PNG)")
def download_result_image(job_id: str, image: Literal[RESULT_IMAGES], state: StateDep,  # type: ignore[valid-type]
                          owner: OwnerDep):
    finished_job(state, owner, job_id)
    return _file(state.artifacts.result_file(job_id, f"{image}.png"), "image/png")

