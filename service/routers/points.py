"""``/jobs/{id}/points`` and ``/jobs/{id}/dense/...``: a finished ``dense`` job's keypoint transfer and
its dense outputs (``models.dense``).

Transfer runs here in the API process: NumPy over the job's ``model/flows.npy`` (no torch, no
worker; :func:`models.dense.transfer.transfer_points`). Points are in each image's own input pixels
by default (``units: "input"``; pixel centres at integers, origin at the top-left centre, the
convention of the job's transforms), or in the job's working-size pixels (``units: "working"``,
the pixels of ``flows.npy``); images are named as in ``names.txt`` or by index.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from models.dense.outputs import CONVENTION, load_outputs
from models.dense.transfer import input_from_working, transfer_points, working_from_input

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
                                              description="[[x, y], ...] in the source's pixels (see units)")
    units: Literal["input", "working"] = Field(
        "input", description="input: each image's own pixels as uploaded; working: the job's working size "
                             "(the pixels of flows.npy)")
    targets: list[ImageRef] | None = Field(None, min_length=1, max_length=MAX_TARGETS,
                                           description="images to transfer to (names or indices); default: all others")


class DenseTarget(BaseModel):
    name: str
    index: int
    input_size: list[int] = Field(description="[H, W] of this image as uploaded")
    points: list[list[float]]


class DensePointsPublic(BaseModel):
    source: str
    index: int
    units: Literal["input", "working"]
    input_size: list[int] = Field(description="[H, W] of the source image as uploaded")
    size: list[int] = Field(description="[H, W]: the job's working size (the pixels of flows.npy)")
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


def _input_sizes(state: ServiceState, job_id: str, n: int, working: tuple[int, int]) -> np.ndarray:
    path = state.artifacts.output_dir(job_id) / "per_image.npy"
    try:
        sizes = np.load(path, allow_pickle=False)["input_size"]
    except (OSError, ValueError, KeyError):
        sizes = None
    if sizes is None or len(sizes) != n:  # an output without them: the images were used as uploaded
        sizes = np.tile(np.array(working, np.int64), (n, 1))
    return sizes


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
    sizes = _input_sizes(state, job_id, n, (H, W))
    units = sizes if body.units == "input" else np.tile([H, W], (n, 1))  # the pixels points are given in
    h, w = (int(v) for v in units[a])
    what = "input" if body.units == "input" else "working-size"
    for x, y in body.points:
        if not (0 <= x <= w - 1 and 0 <= y <= h - 1):
            raise HTTPException(422, f"point ({x}, {y}) is outside the {w} x {h} {what} image {names[a]!r} "
                                     f"(x in [0, {w - 1}], y in [0, {h - 1}])")
    pts = working_from_input(body.points, units[a], (H, W))
    targets = [DenseTarget(name=names[b], index=b, input_size=[int(v) for v in sizes[b]],
                           points=input_from_working(transfer_points(flows, a, b, pts, masks), units[b], (H, W)).tolist())
               for b in bs]
    return DensePointsPublic(source=names[a], index=a, units=body.units, input_size=[int(v) for v in sizes[a]],
                             size=[H, W], convention=CONVENTION, targets=targets)


@router.post("/{job_id}/points", response_model=DensePointsPublic, name="transfer_dense_points",
             responses={**_ERRORS, 415: {"model": ErrorPublic}}, openapi_extra=json_body_openapi(DensePointsCreate),
             summary="Transfer points from one image of a dense job to others, through its canonical grid")
async def transfer_dense_points(job_id: str, request: Request, state: StateDep, owner: OwnerDep) -> DensePointsPublic:
    """``{"source": "cat3.png", "points": [[x, y], ...], "targets": ["cat7.png"]}`` (targets default to
    every other image; points in the images' own pixels unless ``"units": "working"``): each point
    lands on the pixel of each target whose canonical point is nearest, refined below the pixel."""
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
