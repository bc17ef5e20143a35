"""``/models``: trained aligners (one per succeeded align job) and inference with them."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import zipfile
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from ..contracts import JobKind, JobRecord, JobStatus
from ..deps import OwnerDep, ServiceState, StateDep, load_job
from ..jobs import accept_job, multipart_openapi, to_public
from ..schemas import AlignmentPublic, ErrorPublic, JobPublic, ModelPublic, TransformPublic, ts
from .jobs import IdempotencyKey, dispatch_new, replayed

__all__ = ["router", "InferenceCreate"]

router = APIRouter(prefix="/models", tags=["models"])


class InferenceCreate(BaseModel):
    """Inference takes no options: the model fixes the method, warp and working size."""

    model_config = ConfigDict(extra="forbid")


def _model_job(state: ServiceState, owner: str, model_id: str) -> JobRecord:
    try:
        rec = load_job(state, owner, model_id)
    except HTTPException:
        raise HTTPException(404, f"no trained model with id {model_id!r}") from None
    if rec.kind != JobKind.align:
        raise HTTPException(404, f"no trained model with id {model_id!r} (that is an inference job)")
    if rec.status != JobStatus.succeeded:
        raise HTTPException(409, f"job {model_id} is {rec.status.value}; its model exists once it has succeeded")
    if not state.artifacts.has_model(model_id):
        raise HTTPException(404, f"job {model_id} produced no reusable model (method {rec.options.method})")
    return rec


@router.get("/{model_id}", response_model=ModelPublic, name="get_model",
            responses={404: {"model": ErrorPublic}, 409: {"model": ErrorPublic}},
            summary="A trained aligner: what it was trained on and how to use it")
def get_model(model_id: str, request: Request, state: StateDep, owner: OwnerDep) -> ModelPublic:
    rec = _model_job(state, owner, model_id)
    pipe = json.loads((state.artifacts.model_dir(model_id) / "pipeline.json").read_text())
    path = request.app.url_path_for
    return ModelPublic(id=model_id, job=model_id, method=pipe["method"], warp=pipe["warp"],
                       working_size=pipe["working_size"], channels=pipe["channels"], created_at=ts(rec.finished_at),
                       links={"job": path("get_job", job_id=model_id),
                              "align": path("align_with_model", model_id=model_id),
                              "download": path("download_model", model_id=model_id)})


@router.get("/{model_id}/download", name="download_model", response_class=FileResponse,
            responses={404: {"model": ErrorPublic}, 409: {"model": ErrorPublic},
                       200: {"content": {"application/zip": {}}}},
            summary="The trained aligner's folder (weights, config, pipeline.json) as one zip")
def download_model(model_id: str, state: StateDep, owner: OwnerDep):
    """Unzipped, its ``model/`` folder is what ``congeal apply MODEL_DIR INPUT --out OUT`` reads. Built
    once per model, then served as it is."""
    _model_job(state, owner, model_id)
    return FileResponse(_model_zip(state, model_id), media_type="application/zip",
                        filename=f"model-{model_id}.zip")


def _model_zip(state: ServiceState, model_id: str):
    path = state.artifacts.job_dir(model_id) / "model.zip"
    if path.is_file():
        return path
    src = state.artifacts.model_dir(model_id)
    tmp = path.with_name(f".model.zip.{os.getpid()}.{time.monotonic_ns()}")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(src.rglob("*")):
            if f.is_file() and not f.is_symlink():
                zf.write(f, arcname=f"model/{f.relative_to(src).as_posix()}")
    tmp.replace(path)  # two requests at once each build one; either result is the same
    return path


@router.post(
    "/{model_id}/align", name="align_with_model", response_model=None,
    summary="Align new images with a trained model",
    responses={
        200: {"model": AlignmentPublic, "description": "small batch: the transforms, answered synchronously"},
        202: {"model": JobPublic, "description": "large batch (or wait=false, or the wait timed out): a job"},
        404: {"model": ErrorPublic}, 409: {"model": ErrorPublic}, 413: {"model": ErrorPublic},
        422: {"model": ErrorPublic}, 500: {"model": ErrorPublic, "description": "inference failed on the worker"},
    },
    openapi_extra=multipart_openapi(None, "images to align (or one archive); no options"),
)
async def align_with_model(
    model_id: str, request: Request, response: Response, state: StateDep, owner: OwnerDep,
    wait: Annotated[bool, Query(description="answer synchronously when the batch is small enough")] = True,
    include_images: Annotated[bool, Query(description="synchronous answers: embed the aligned PNGs (base64)")] = False,
    idempotency_key: IdempotencyKey = None,
) -> AlignmentPublic | JobPublic:
    """Runs on a worker, like training, so the API never loads a model itself. Batches of at
    most ``sync_inference_max_images`` images are waited for (up to ``sync_inference_timeout_s``)
    and answered with the transforms; larger ones, or a wait that times out, answer ``202``
    with a job to poll, whose results download like any job's."""
    await run_in_threadpool(_model_job, state, owner, model_id)
    rec = await replayed(state, owner, idempotency_key, JobKind.apply, model_id)
    if rec is None:
        rec, created = await accept_job(request, state, owner, kind=JobKind.apply, options_model=InferenceCreate,
                                        min_images=1, model_id=model_id, idempotency_key=idempotency_key)
        if created:
            await run_in_threadpool(dispatch_new, state, rec)
    s = state.settings
    if wait and rec.n_inputs <= s.sync_inference_max_images:
        deadline = time.monotonic() + s.sync_inference_timeout_s
        while not rec.terminal and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            rec = await run_in_threadpool(state.store.get, rec.id) or rec
        if rec.status == JobStatus.succeeded:
            return await run_in_threadpool(_alignment, state, rec, request, include_images)
        if rec.status == JobStatus.failed:
            code = 422 if rec.error_kind == "input" else 500
            raise HTTPException(code, f"inference job {rec.id} failed: {rec.error}")
        if rec.status == JobStatus.cancelled:
            raise HTTPException(409, f"inference job {rec.id} was cancelled")
    response.status_code = 202
    pub = to_public(rec, request)
    response.headers["Location"] = pub.links.self
    return pub


def _alignment(state: ServiceState, rec: JobRecord, request: Request, include_images: bool) -> AlignmentPublic:
    out = state.artifacts.output_dir(rec.id)
    t = json.loads((out / "transforms.json").read_text())
    path = request.app.url_path_for
    images = []
    for im in t["images"]:
        png = base64.b64encode((out / im["aligned_file"]).read_bytes()).decode() if include_images else None
        images.append(TransformPublic(
            name=im["name"], aligned_file=im["aligned_file"], input_size=im["input_size"], matrix=im["matrix"],
            fill=im["fill"], url=path("download_aligned_image", job_id=rec.id, name=quote(im["name"])),
            png_base64=png))
    return AlignmentPublic(job=to_public(rec, request), convention=t["convention"], output_size=t["output_size"],
                           images=images)
