"""``/jobs/{id}/points`` and ``/jobs/{id}/dense/...``: a finished ``dense`` job's keypoint transfer and
its dense outputs (``models.dense``).

Transfer runs here in the API process: NumPy over the job's ``model/flows.npy`` (no torch, no
worker; :func:`models.dense.transfer.transfer_points`). Points are in the job's working-size pixels
(``dense.json``'s ``size``; pixel centres at integers, origin at the top-left centre); images are
named as in ``names.txt`` or by index.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from models.dense.outputs import CONVENTION, load_outputs
from models.dense.transfer import transfer_points

from ..bodies import json_body_openapi, read_json_body
from ..deps import OwnerDep, ServiceState, StateDep
from ..schemas import ErrorPublic
from .jobs import finished_job

__all__ = ["router", "DensePointsCreate", "DensePointsPublic"]

router = APIRouter(prefix="/jobs", tags=["dense"])

MAX_POINTS = 1_000
MAX_TARGETS = 64
DENSE_FILES = {"atlas.png": "image/png", "transfer.png": "image/png", "flows.npy": "application/octet-stream",
               "masks.npy": "application/octet-stream"}
ImageRef = str | int


class DensePointsCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: ImageRef = Field(description="the image the points are on: its name (names.txt) or index")
    points: list[tuple[float, float]] = Field(min_length=1, max_length=MAX_POINTS,
                                              description="[[x, y], ...] in working-size pixels")
    targets: list[ImageRef] | None = Field(None, min_length=1, max_length=MAX_TARGETS,
                                           description="images to transfer to (names or indices); default: all others")


class DenseTarget(BaseModel):
    name: str
    index: int
    points: list[list[float]]


class DensePointsPublic(BaseModel):
    source: str
    index: int
    size: list[int] = Field(description="[H, W]: the working size the points are in")
    convention: str
    targets: list[DenseTarget]


_ERRORS = {404: {"model": ErrorPublic, "description": "no such job, or not a dense job"},
           409: {"model": ErrorPublic, "description": "the job has not succeeded"},
           422: {"model": ErrorPublic, "description": "unknown image, or a point outside the image"}}


def _model_dir(state: ServiceState, owner: str, job_id: str) -> Path:
    rec = finished_job(state, owner, job_id)
    d = state.artifacts.output_dir(job_id) / "model"
    if not (d / "flows.npy").is_file():
        raise HTTPException(404, f"job {job_id} was not aligned with method dense (method {rec.options.method}); "
                                 f"point transfer needs its dense maps")
    return d


def _names(state: ServiceState, job_id: str) -> list[str]:
    path = state.artifacts.output_dir(job_id) / "names.txt"
    return path.read_text(encoding="utf-8").splitlines() if path.is_file() else []


def _index(ref: ImageRef, names: list[str], n: int, field: str) -> int:
    if isinstance(ref, int):
        if not 0 <= ref < n:
            raise HTTPException(422, f"{field}: index {ref} is out of range (the job has {n} images)")
        return ref
    try:
        return names.index(ref)
    except ValueError:
        raise HTTPException(422, f"{field}: {ref!r} is not the name of one of the job's images") from None


def _transfer(state: ServiceState, owner: str, job_id: str, body: DensePointsCreate) -> DensePointsPublic:
    d = _model_dir(state, owner, job_id)
    out = load_outputs(d)
    flows, masks = out["flows"], out["masks"]
    n, H, W = flows.shape[:3]
    names = _names(state, job_id)
    if len(names) != n:
        names = [str(i) for i in range(n)]
    a = _index(body.source, names, n, "source")
    bs = [_index(t, names, n, "targets") for t in body.targets] if body.targets else [b for b in range(n) if b != a]
    for x, y in body.points:
        if not (0 <= x <= W - 1 and 0 <= y <= H - 1):
            raise HTTPException(422, f"point ({x}, {y}) is outside the {W} x {H} working-size image "
                                     f"(x in [0, {W - 1}], y in [0, {H - 1}])")
    targets = [DenseTarget(name=names[b], index=b,
                           points=[[float(u), float(v)] for u, v in transfer_points(flows, a, b, body.points, masks)])
               for b in bs]
    return DensePointsPublic(source=names[a], index=a, size=[H, W], convention=CONVENTION, targets=targets)


@router.post("/{job_id}/points", response_model=DensePointsPublic, name="transfer_dense_points",
             responses={**_ERRORS, 415: {"model": ErrorPublic}}, openapi_extra=json_body_openapi(DensePointsCreate),
             summary="Transfer points from one image of a dense job to others, through its canonical grid")
async def transfer_dense_points(job_id: str, request: Request, state: StateDep, owner: OwnerDep) -> DensePointsPublic:
    """``{"source": "cat3.png", "points": [[x, y], ...], "targets": ["cat7.png"]}`` (targets default to
    every other image): each point lands on the pixel of each target whose canonical point is
    nearest, refined below the pixel."""
    body = await read_json_body(request, DensePointsCreate, 64 * MAX_POINTS + 64 * MAX_TARGETS + 1024,
                                '{"source": "NAME", "points": [[x, y], ...], "targets": ["NAME", ...]}')
    return await run_in_threadpool(_transfer, state, owner, job_id, body)


@router.get("/{job_id}/dense/{file}", name="download_dense_file", responses=_ERRORS, response_class=FileResponse,
            summary="A dense job's atlas.png, transfer.png (figure of transferred points), flows.npy or masks.npy")
def download_dense_file(job_id: str, file: Literal[tuple(DENSE_FILES)], state: StateDep,  # type: ignore[valid-type]
                        owner: OwnerDep):
    """``flows.npy``: ``(N, H, W, 2)`` float32 canonical points of every working-size pixel;
    ``masks.npy``: ``(N, H, W)`` foreground; ``np.load(..., allow_pickle=False)``."""
    path = _model_dir(state, owner, job_id) / file
    if not path.is_file():
        raise HTTPException(404, f"job {job_id}'s output has no {file}")
    return FileResponse(path, media_type=DENSE_FILES[file], filename=f"{job_id}-{file}")
