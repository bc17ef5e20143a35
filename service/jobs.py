"""Job helpers the routers share: accepting an upload as a job, and the public view of a record."""
from __future__ import annotations

import logging
import shutil
from typing import Any, Callable

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from models.imageio import LoadLimits

from .contracts import METHOD_MAX_IMAGES, RESULT_IMAGES, JobKind, JobOptions, JobRecord, JobStatus, new_job_id
from .contracts.datasets import DatasetUnavailable, release_use, use_dataset
from .contracts.logs import bind, current
from .contracts.store import InFlightLimit
from .deps import ServiceState
from .schemas import (AttemptPublic, JobLinks, JobPublic, MetricsPublic, ProgressPublic, ts)
from .uploads import FILE_FIELD, UploadError, check_upload, receive_upload

__all__ = ["accept_job", "to_public", "multipart_openapi", "field_error", "upload_limits"]

log = logging.getLogger("congeal.api")


def field_error(field: str, msg: str, kind: str = "value_error") -> RequestValidationError:
    """A 422 in FastAPI's own shape, naming the form field."""
    return RequestValidationError([{"type": kind, "loc": ("body", field), "msg": msg}])


def _parse_options(model: type[BaseModel], fields: dict[str, str]) -> BaseModel:
    data = {k: v for k, v in fields.items() if v != ""}  # an empty form field means "use the default"
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False, include_context=False)]
        ) from None


def upload_limits(state: ServiceState) -> LoadLimits:
    """The image limits an upload is checked against."""
    s = state.settings
    return LoadLimits(max_images=s.max_images_per_job, max_pixels=s.max_pixels_per_image,
                      max_side=s.max_side_per_image, max_archive_members=s.max_archive_members,
                      max_total_bytes=s.max_uncompressed_bytes, max_compression_ratio=s.max_compression_ratio,
                      max_file_bytes=min(LoadLimits().max_file_bytes, s.max_upload_bytes),
                      allowed_formats=tuple(sorted(f.upper() for f in s.image_formats)))


async def accept_job(request: Request, state: ServiceState, owner: str, *, kind: JobKind,
                     options_model: type[BaseModel], min_images: int, model_id: str | None = None,
                     idempotency_key: str | None = None,
                     prepare: Callable[[BaseModel, list[str], str], None] | None = None) -> tuple[JobRecord, bool]:
    """Receive an upload into a new job's input folder, validate it, store the record.

    ``prepare(options, image names, job id)``, if given, checks the options against the uploaded
    images and writes what else the job needs (raising a 4xx to refuse), before the record exists.
    Returns the record and whether it is new (``False``: an idempotent replay).
    The task is not sent here; the caller dispatches new jobs.
    """
    s = state.settings
    in_flight = await run_in_threadpool(state.store.count_in_flight, owner)
    if in_flight >= s.max_jobs_in_flight_per_key:
        # Checked before the upload is read, so a tenant at its limit costs no disk; checked
        # again atomically with the insert, so uploads racing past this check cannot both start.
        raise _too_many(in_flight, s.max_jobs_in_flight_per_key)
    job_id = new_job_id()
    dest = state.artifacts.input_dir(job_id)
    held = None  # (dataset id, job id) once the job holds a dataset
    try:
        up = await receive_upload(request, dest, max_bytes=s.max_upload_bytes, max_files=s.max_files_per_upload,
                                  image_exts=s.image_extensions, fields=frozenset(options_model.model_fields))
        opts = _parse_options(options_model, up.fields)
        dataset_id = getattr(opts, "dataset", None)
        job_options = (JobOptions(**opts.model_dump(exclude={"dataset"})) if isinstance(opts, JobOptions)
                       else JobOptions())
        if job_options.budget is not None and job_options.budget > s.max_budget:
            raise field_error("budget", f"at most {s.max_budget} epochs on this service")
        if job_options.gpus > s.max_gpus_per_job:
            raise field_error("gpus", f"at most {s.max_gpus_per_job} GPU(s) a job on this service")
        if job_options.gpus > 1 and job_options.method != "dprc":
            raise field_error("gpus", f"method {job_options.method} trains on one device; only dprc uses several")
        if job_options.features == "vit" and s.vit_weights is None:
            raise field_error("features", "this service has no ViT weights (its operator sets CONGEAL_VIT_WEIGHTS); "
                                          "use randconv or hog")
        if job_options.time_limit_s is not None and job_options.time_limit_s > s.job_time_limit_s:
            raise field_error("time_limit_s", f"at most {s.job_time_limit_s} s on this service")
        if dataset_id is not None:
            ds, held = await _dataset_input(state, owner, dataset_id, job_id, up.files, min_images, job_options)
            n_inputs, input_bytes, archive = ds.n_images, ds.bytes_declared, ds.input_name
        else:
            names, archive = await check_upload(dest, up.files, upload_limits(state), min_images,  # decodes: last
                                                s.image_formats, gate=state.upload_gate, owner=owner)
            if job_options.reference is not None and job_options.reference not in names:
                raise field_error("reference", f"{job_options.reference!r} is not the name of an uploaded image")
            n_inputs, input_bytes = len(names), up.total_bytes
            if prepare is not None:
                await run_in_threadpool(prepare, opts, names, job_id)
        cap = METHOD_MAX_IMAGES.get(job_options.method) if kind == JobKind.align else None
        if cap is not None and n_inputs > cap:
            raise field_error("method", f"method {job_options.method} aligns small collections, at most {cap} images "
                                        f"(this job has {n_inputs}): its cost grows with the square of the "
                                        f"collection; use dprc")
        rec = JobRecord(id=job_id, kind=kind, owner=owner, options=job_options, model_id=model_id,
                        n_inputs=n_inputs, input_bytes=input_bytes, input_archive=archive, dataset_id=dataset_id,
                        idempotency_key=idempotency_key, request_id=current("request_id"))
        stored, created = await run_in_threadpool(state.store.insert, rec, s.max_jobs_in_flight_per_key)
    except InFlightLimit as e:
        _discard(state, job_id, held)
        raise _too_many(e.count, s.max_jobs_in_flight_per_key) from None
    except UploadError as e:
        _discard(state, job_id, held)
        raise HTTPException(e.status, e.detail) from None
    except BaseException:
        _discard(state, job_id, held)
        raise
    if not created:  # lost an idempotency race to an identical request: keep the winner only
        _discard(state, job_id, held)
    else:
        bind(job_id=stored.id)  # the request's own line names the job too
        log.info("job %s created: %s, %d image(s)", stored.id, kind.value, stored.n_inputs,
                 extra={"tenant": owner, "dataset_id": stored.dataset_id} if stored.dataset_id else {"tenant": owner})
    return stored, created


async def _dataset_input(state: ServiceState, owner: str, dataset_id: str, job_id: str, files: list[str],
                         min_images: int, options: JobOptions):
    """The ready dataset a job names, now held by it (a DELETE is refused until the job ends).
    Returns the dataset and what to release if the job is not created after all."""
    if files:
        raise UploadError(422, [{"loc": ["body", "dataset"], "type": "dataset_and_files",
                                 "msg": f"send either file parts or a dataset, not both ({len(files)} file(s) sent)"}])
    try:
        ds = await run_in_threadpool(use_dataset, state.datasets, state.store, dataset_id, owner, job_id,
                                     state.settings.max_images_per_job, min_images)
    except DatasetUnavailable as e:
        raise UploadError(e.status, e.message) from None
    held = (dataset_id, job_id)
    if options.reference is not None:
        path = state.artifacts.dataset_dir(dataset_id) / "names.txt"
        if not await run_in_threadpool(_lists_name, path, options.reference):
            await run_in_threadpool(release_use, state.datasets, dataset_id, job_id)
            raise field_error("reference", f"{options.reference!r} is not the name of an image in dataset "
                                           f"{dataset_id}")
    return ds, held


def _lists_name(names_txt, name: str) -> bool:
    """Whether ``name`` is a line of the dataset's names file (streamed: it may list millions)."""
    want = name + "\n"
    try:
        with open(names_txt, encoding="utf-8") as f:
            return any(line == want for line in f)
    except OSError:  # written when the dataset became ready; gone only with the dataset
        return False


def _too_many(in_flight: int, limit: int) -> HTTPException:
    return HTTPException(429, f"{in_flight} jobs queued or running; at most {limit} per API key: "
                              f"wait for one to finish", headers={"Retry-After": "10"})


def _discard(state: ServiceState, job_id: str, held: tuple[str, str] | None = None) -> None:
    shutil.rmtree(state.artifacts.job_dir(job_id), ignore_errors=True)
    if held is not None:
        release_use(state.datasets, *held)


def multipart_openapi(options_model: type[BaseModel] | None, files_doc: str) -> dict[str, Any]:
    """OpenAPI for a body we parse ourselves (streamed), so the docs still show its fields."""
    props: dict[str, Any] = {FILE_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"},
                                          "description": files_doc}}
    if options_model is not None:
        props.update(options_model.model_json_schema()["properties"])
    # A job may name a dataset instead of sending files: then no file part is required.
    required = [] if "dataset" in props else [FILE_FIELD]
    schema = {"type": "object", "properties": props, "required": required, "additionalProperties": False}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


def to_public(rec: JobRecord, request: Request) -> JobPublic:
    path = request.app.url_path_for
    links = JobLinks(self=path("get_job", job_id=rec.id))
    if not rec.terminal:
        links.cancel = path("cancel_job", job_id=rec.id)
    if rec.kind == JobKind.pair:
        links.pairs = path("get_pair_job", job_id=rec.id)
    elif rec.status == JobStatus.succeeded:
        links.transforms = path("download_transforms", job_id=rec.id)
        links.metrics = path("download_metrics", job_id=rec.id)
        if (rec.result or {}).get("has_report"):
            links.report = path("download_report", job_id=rec.id)
        links.aligned_zip = path("download_aligned_zip", job_id=rec.id)
        links.aligned_image = path("download_aligned_image", job_id=rec.id, name="{name}")
        for n in RESULT_IMAGES:
            setattr(links, n, path("download_result_image", job_id=rec.id, image=n))
        if rec.kind == JobKind.align and (rec.result or {}).get("has_model"):
            links.model = path("get_model", model_id=rec.id)
            links.model_download = path("download_model", model_id=rec.id)
            links.align_with_model = path("align_with_model", model_id=rec.id)
        links.per_image = path("list_per_image", job_id=rec.id)
        links.gallery = path("list_gallery", job_id=rec.id)
        links.summary = path("get_summary", job_id=rec.id)
        arrays = (rec.result or {}).get("array_files") or []
        if "transforms.npy" in arrays:
            links.transforms_npy = path("download_transforms_npy", job_id=rec.id)
        if "per_image.npy" in arrays:
            links.per_image_npy = path("download_per_image_npy", job_id=rec.id)
        if "names.txt" in arrays:
            links.names_txt = path("download_names_txt", job_id=rec.id)
    if rec.dataset_id:
        links.dataset = path("get_dataset", dataset_id=rec.dataset_id)
    model_id = rec.model_id
    if rec.kind == JobKind.align:
        model_id = rec.id if rec.status == JobStatus.succeeded and (rec.result or {}).get("has_model") else None
    p = rec.progress
    return JobPublic(
        id=rec.id, kind=rec.kind, status=rec.status, n_images=rec.n_inputs,
        options=rec.options if rec.kind == JobKind.align else None,
        model_id=model_id, created_at=ts(rec.created_at), started_at=ts(rec.started_at),
        finished_at=ts(rec.finished_at), updated_at=ts(rec.updated_at),
        progress=None if p is None else ProgressPublic(**{**p.model_dump(), "updated_at": ts(p.updated_at)}),
        cancel_requested=rec.cancel_requested, error=rec.error, error_type=rec.error_kind,
        metrics=MetricsPublic(**rec.result) if rec.result else None,
        attempts=[AttemptPublic(**{**a.model_dump(), "started_at": ts(a.started_at), "ended_at": ts(a.ended_at)})
                  for a in rec.attempts],
        links=links,
    )
