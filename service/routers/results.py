"""``/jobs/{id}/per-image`` and the array files: a finished job's per-image results at any scale.

Beside ``routers/jobs.py`` (the job resource and its small-job downloads) because these
read the job output contract's arrays (``service.results``): a page of a 10,000,000-image job
costs what the page holds, not what the job holds.
"""
from __future__ import annotations

import json
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from models.report import checks as report_checks

from ..contracts import RESULT_IMAGES
from ..deps import PAGE_OFFSET_MAX, OwnerDep, StateDep, check_page_limit, load_job
from ..inputs import InputUnavailable, input_png
from ..jobs import upload_limits
from ..results import ResultsUnavailable, open_per_image
from ..schemas import ErrorPublic, GalleryItemPublic, GalleryPage, PerImagePage, PerImagePublic, SummaryPublic
from .jobs import finished_job

__all__ = ["router"]

router = APIRouter(prefix="/jobs", tags=["results"])

_DL = {404: {"model": ErrorPublic, "description": "no such job, or its output lacks the file"},
       409: {"model": ErrorPublic, "description": "the job has not succeeded"}}


@router.get("/{job_id}/per-image", response_model=PerImagePage, name="list_per_image", responses={
    **_DL, 422: {"model": ErrorPublic, "description": "offset or limit out of range"}},
    summary="Per-image results, a page at a time: matrix, fill, residual, outlier, content kept, ...")
def list_per_image(job_id: str, request: Request, state: StateDep, owner: OwnerDep,
                   offset: Annotated[int, Query(ge=0, description="index of the first image")] = 0,
                   limit: Annotated[int, Query(ge=1, description="images per page (at most the service's "
                                                                 "per_image_page_size_max)")] = 100
                   ) -> PerImagePage:
    """Rows in index order (the order of ``names.txt`` / ``transforms.json``). Read from the output's
    arrays (``transforms.npy``, ``per_image.npy``, ``names.txt``) when it has them, else from
    ``transforms.json`` and ``metrics.json``; ``source`` says which. An offset at or beyond
    ``total`` is an empty page."""
    check_page_limit(limit, state.settings.per_image_page_size_max)
    finished_job(state, owner, job_id)
    try:
        src = open_per_image(state.artifacts.output_dir(job_id))
        rows = src.rows(min(offset, PAGE_OFFSET_MAX), limit)
    except ResultsUnavailable as e:
        raise HTTPException(404, f"job {job_id}: {e}") from None
    path = request.app.url_path_for
    data = []
    for r in rows:
        if src.aligned_pngs:
            r["aligned_url"] = path("download_aligned_image", job_id=job_id, name=quote(r["name"]))
        data.append(PerImagePublic(**r))
    nxt = None
    if offset + limit < src.total:
        nxt = f"{path('list_per_image', job_id=job_id)}?offset={offset + limit}&limit={limit}"
    return PerImagePage(data=data, total=src.total, offset=offset, limit=limit, next=nxt, source=src.source)


def _array_file(state, owner: str, job_id: str, name: str, media_type: str) -> FileResponse:
    finished_job(state, owner, job_id)
    path = state.artifacts.output_dir(job_id) / name
    if not path.is_file():
        raise HTTPException(404, f"job {job_id}'s output has no {name} (outputs written before the array "
                                 f"files existed have only the JSON: use /per-image or /transforms)")
    return FileResponse(path, media_type=media_type, filename=f"{job_id}-{name}")


@router.get("/{job_id}/transforms.npy", name="download_transforms_npy", responses=_DL, response_class=FileResponse,
            summary="Every image's 3x3 matrix: float64 (N, 3, 3), np.load(..., allow_pickle=False)")
async def download_transforms_npy(job_id: str, state: StateDep, owner: OwnerDep):
    return await run_in_threadpool(_array_file, state, owner, job_id, "transforms.npy", "application/octet-stream")


@router.get("/{job_id}/per_image.npy", name="download_per_image_npy", responses=_DL, response_class=FileResponse,
            summary="Per-image metrics: a structured (N,) array (residual, outlier, content_kept, area_scale, "
                    "edge_contact, touches_edge, consistency_px, fill, input_size, fallback)")
async def download_per_image_npy(job_id: str, state: StateDep, owner: OwnerDep):
    return await run_in_threadpool(_array_file, state, owner, job_id, "per_image.npy", "application/octet-stream")


@router.get("/{job_id}/names.txt", name="download_names_txt", responses=_DL, response_class=FileResponse,
            summary="Image names, one a line (UTF-8), in index order")
async def download_names_txt(job_id: str, state: StateDep, owner: OwnerDep):
    return await run_in_threadpool(_array_file, state, owner, job_id, "names.txt", "text/plain; charset=utf-8")


@router.get("/{job_id}/gallery", response_model=GalleryPage, name="list_gallery", responses={
    **_DL, 422: {"model": ErrorPublic, "description": "offset or limit out of range"}},
    summary="Per-image results ordered by residual, largest first (outliers first), with input links")
def list_gallery(job_id: str, request: Request, state: StateDep, owner: OwnerDep,
                 offset: Annotated[int, Query(ge=0, description="rank of the first image")] = 0,
                 limit: Annotated[int, Query(ge=1, description="images per page (at most the service's "
                                                               "per_image_page_size_max)")] = 24
                 ) -> GalleryPage:
    """The rows of ``/per-image``, ranked by residual: what the web page's gallery shows, each
    aligned image beside its input. Ranking reads every image's residual once (N floats)."""
    check_page_limit(limit, state.settings.per_image_page_size_max)
    finished_job(state, owner, job_id)
    try:
        src = open_per_image(state.artifacts.output_dir(job_id))
        order = src.by_residual()
        offset = min(offset, PAGE_OFFSET_MAX)
        rows = src.rows_at(order[offset:offset + limit])
    except ResultsUnavailable as e:
        raise HTTPException(404, f"job {job_id}: {e}") from None
    path = request.app.url_path_for
    data = []
    for rank, r in enumerate(rows, start=offset):
        if src.aligned_pngs:
            r["aligned_url"] = path("download_aligned_image", job_id=job_id, name=quote(r["name"]))
        data.append(GalleryItemPublic(**r, rank=rank,
                                      input_url=path("download_input_image", job_id=job_id, name=quote(r["name"]))))
    nxt = None
    if offset + limit < src.total:
        nxt = f"{path('list_gallery', job_id=job_id)}?offset={offset + limit}&limit={limit}"
    return GalleryPage(data=data, total=src.total, offset=offset, limit=limit, next=nxt)


@router.get("/{job_id}/summary", response_model=SummaryPublic, name="get_summary", responses=_DL,
            summary="The result at a glance: checks and warnings in words, mean/variance image links")
def get_summary(job_id: str, request: Request, state: StateDep, owner: OwnerDep) -> SummaryPublic:
    """The same checks, in the same words, as the job's ``report.html`` (``models.report.checks``)."""
    finished_job(state, owner, job_id)
    try:
        m = json.loads(state.artifacts.result_file(job_id, "metrics.json").read_text())
    except (OSError, ValueError):
        raise HTTPException(404, f"job {job_id}: metrics.json is missing from the artifact store") from None
    path = request.app.url_path_for
    out = state.artifacts.output_dir(job_id)
    images = {k: path("download_result_image", job_id=job_id, image=k) for k in RESULT_IMAGES
              if (out / f"{k}.png").is_file()}
    return SummaryPublic(n_images=m.get("n_images") or 0, method=m.get("method"), warp=m.get("warp"),
                         apsnr_before=m.get("apsnr_before"), apsnr_after=m.get("apsnr_after"),
                         checks=[c.__dict__ for c in report_checks(m)], warnings=m.get("warnings") or [],
                         notes=m.get("notes") or [], images=images)


@router.get("/{job_id}/inputs/{name:path}", name="download_input_image", response_class=Response,
            responses={404: {"model": ErrorPublic, "description": "no such job or input image"},
                       200: {"content": {"image/png": {}}}},
            summary="One uploaded input image, by name, as a PNG at most max_side pixels on its longer side")
async def download_input_image(job_id: str, name: str, state: StateDep, owner: OwnerDep,
                               max_side: Annotated[int, Query(ge=8, le=2048)] = 256) -> Response:
    """Any job's input, at any status (the page shows a pair's source and target, and each gallery
    image's input). Only that image is read and decoded, under the upload limits."""
    rec = await run_in_threadpool(load_job, state, owner, job_id)
    source = state.artifacts.job_input(rec.id, rec.input_archive, rec.dataset_id)
    try:
        png = await run_in_threadpool(input_png, source, name, max_side, upload_limits(state))
    except InputUnavailable as e:
        raise HTTPException(404, f"job {job_id}: {e}") from None
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
