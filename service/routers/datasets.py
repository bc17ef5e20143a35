"""``/datasets``: collections uploaded once, in resumable chunks, that several jobs name.

``POST /datasets`` declares the files; ``PUT /datasets/{id}/files/{name}`` sends each file in
chunks (``Content-Range``); ``GET /datasets/{id}`` says how many bytes of each arrived (a
client that lost its connection continues from there); ``POST /datasets/{id}/complete``
validates it (``validating`` -> ``ready`` or ``invalid``) and freezes it; ``POST /jobs`` with
the form field ``dataset=<id>`` aligns it. See ``service.datasets``.
"""
from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool

from ..bodies import json_body_openapi, read_json_body
from ..contracts import new_dataset_id
from ..contracts.datasets import (DatasetFile, DatasetQuota, DatasetRecord, begin_delete, check_file_name,
                                  classify_files, purge_dataset)
from ..datasets import complete_dataset, file_public, load_dataset, receive_chunk, to_public
from ..deps import PAGE_OFFSET_MAX, OwnerDep, ServiceState, StateDep, check_page_limit
from ..schemas import DatasetCreate, DatasetFilePublic, DatasetPublic, DatasetsPublic, ErrorPublic

__all__ = ["router"]

router = APIRouter(prefix="/datasets", tags=["datasets"])

_E404 = {"model": ErrorPublic, "description": "no such dataset (or another tenant's)"}
_CREATE_BYTES_PER_FILE = 1024  # a file's entry in POST /datasets is well under this


def _create(state: ServiceState, owner: str, body: DatasetCreate) -> DatasetRecord:
    s = state.settings
    if len(body.files) > s.max_dataset_files:
        raise HTTPException(413, f"{len(body.files)} files, above the limit of {s.max_dataset_files} per dataset")
    seen: set[str] = set()
    for i, f in enumerate(body.files):
        why = check_file_name(f.name)
        if why:
            raise RequestValidationError([{"type": "value_error", "loc": ("body", "files", i, "name"), "msg": why}])
        if f.name in seen:
            raise RequestValidationError([{"type": "value_error", "loc": ("body", "files", i, "name"),
                                           "msg": f"{f.name!r} is declared twice; file names must be unique"}])
        seen.add(f.name)
    try:
        layout, input_name = classify_files([f.name for f in body.files])
    except ValueError as e:
        raise RequestValidationError([{"type": "value_error", "loc": ("body", "files"), "msg": str(e)}]) from None
    declared = sum(f.size or 0 for f in body.files)
    if declared > s.max_dataset_bytes:
        raise HTTPException(413, f"the declared files hold {declared} bytes, above the limit of "
                                 f"{s.max_dataset_bytes} bytes per dataset")
    rec = DatasetRecord(id=new_dataset_id(), owner=owner, label=body.label, n_files=len(body.files),
                        bytes_declared=declared, layout=layout, input_name=input_name)
    files = [DatasetFile(name=f.name, size=f.size, sha256=f.sha256) for f in body.files]
    try:
        state.datasets.insert(rec, files, s.max_datasets_per_key)
    except DatasetQuota as e:
        raise HTTPException(429, f"{e.count} datasets held; at most {s.max_datasets_per_key} per API key: "
                                 f"delete one first") from None
    try:
        d = state.artifacts.dataset_files(rec.id)
        d.mkdir(parents=True)
        for f in files:  # every file exists from the start: a chunk never creates one
            (d / f.name).touch(exist_ok=False)
    except BaseException:
        purge_dataset(state.datasets, state.artifacts, rec.id)
        raise
    return rec


@router.post("", status_code=201, response_model=DatasetPublic, name="create_dataset",
             summary="Declare a dataset's files; then PUT each file's bytes, in chunks",
             responses={201: {"headers": {"Location": {"schema": {"type": "string"}}}},
                        413: {"model": ErrorPublic, "description": "more files or bytes than a dataset may hold"},
                        415: {"model": ErrorPublic}, 422: {"model": ErrorPublic}},
             openapi_extra=json_body_openapi(DatasetCreate))
async def create_dataset(request: Request, response: Response, state: StateDep, owner: OwnerDep) -> DatasetPublic:
    """``{"files": [{"name": "shard-000.npy", "size": 123, "sha256": "..."}], "label": "..."}``. Nothing
    is uploaded yet; the answer's ``links.upload`` is where each file's chunks go."""
    body = await read_json_body(request, DatasetCreate, 4096 + _CREATE_BYTES_PER_FILE * state.settings.max_dataset_files,
                                "the dataset's files: {\"files\": [{\"name\": ..., \"size\": ...}]}",
                                " (CONGEAL_MAX_DATASET_FILES files at most)")
    rec = await run_in_threadpool(_create, state, owner, body)
    files = await run_in_threadpool(state.datasets.files, rec.id)
    pub = to_public(rec, request, state.settings, files)
    response.headers["Location"] = pub.links.self
    return pub


@router.get("", response_model=DatasetsPublic, name="list_datasets", summary="The caller's datasets, newest first")
def list_datasets(request: Request, state: StateDep, owner: OwnerDep,
                  offset: Annotated[int, Query(ge=0, le=PAGE_OFFSET_MAX)] = 0,
                  limit: Annotated[int, Query(ge=1, description="at most the service's page_size_max")] = 20
                  ) -> DatasetsPublic:
    check_page_limit(limit, state.settings.page_size_max)
    recs, total = state.datasets.list(owner, offset, limit)
    recs = [r for r in recs if not r.deleting]
    nxt = f"{request.app.url_path_for('list_datasets')}?offset={offset + limit}&limit={limit}" \
        if offset + limit < total else None
    return DatasetsPublic(data=[to_public(r, request, state.settings) for r in recs], total=total, offset=offset,
                          limit=limit, next=nxt)


@router.get("/{dataset_id}", response_model=DatasetPublic, name="get_dataset", responses={404: _E404},
            summary="State, bytes received per file (where to resume), image count once ready")
def get_dataset(dataset_id: str, request: Request, state: StateDep, owner: OwnerDep) -> DatasetPublic:
    rec = load_dataset(state.datasets, owner, dataset_id)
    return to_public(rec, request, state.settings, state.datasets.files(dataset_id), jobs=state.store)


@router.put("/{dataset_id}/files/{name}", response_model=DatasetFilePublic, name="upload_dataset_file",
            summary="Append a chunk to a file (Content-Range: bytes a-b/total); streamed to disk",
            responses={400: {"model": ErrorPublic, "description": "malformed range, or a body shorter or longer "
                                                                  "than it (what arrived is kept: see Upload-Offset)"},
                       404: _E404,
                       409: {"model": ErrorPublic, "description": "the chunk does not start at the bytes received "
                             "(the Upload-Offset header and the message say where it must), or the dataset is "
                             "no longer uploading"},
                       411: {"model": ErrorPublic}, 413: {"model": ErrorPublic},
                       416: {"model": ErrorPublic, "description": "a range beyond the file's size"}},
            openapi_extra={"requestBody": {"required": True, "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
async def upload_dataset_file(
    dataset_id: str, name: str, request: Request, response: Response, state: StateDep, owner: OwnerDep,
    content_range: Annotated[str | None, Header(description="bytes <first>-<last>/<total>; left out: the "
                                                            "whole file in one request")] = None,
) -> DatasetFilePublic:
    """The chunk must start where the file stands (``received``, in ``GET /datasets/{id}``). A
    request cut short keeps what reached the disk: ask where the file stands and go on from there."""
    del content_range  # read from the request itself, with Content-Length, in receive_chunk
    await run_in_threadpool(load_dataset, state.datasets, owner, dataset_id)
    f, problem = await receive_chunk(request, state.datasets, state.artifacts, state.settings, owner, dataset_id,
                                     name)
    response.headers["Upload-Offset"] = str(f.received)
    if problem:
        raise HTTPException(400, f"{name}: {problem}; {f.received} bytes kept, continue at that offset",
                            headers={"Upload-Offset": str(f.received)})
    return file_public(f)


@router.post("/{dataset_id}/complete", status_code=202, response_model=DatasetPublic, name="complete_dataset",
             summary="Every file is uploaded: validate the dataset (validating -> ready or invalid) and freeze it",
             responses={200: {"model": DatasetPublic, "description": "ready already"}, 404: _E404,
                        409: {"model": ErrorPublic, "description": "a file is not fully uploaded (named), or the "
                                                                   "dataset is invalid"}})
def complete(dataset_id: str, request: Request, response: Response, state: StateDep, owner: OwnerDep
             ) -> DatasetPublic:
    """Validation reads every image the way a job will, in a separate process with bounded memory
    and time; poll ``GET /datasets/{id}`` until ``state`` is ``ready`` or ``invalid`` (with
    ``error``). Repeating the call is harmless; after the API process that validated it died,
    it starts the validation again."""
    load_dataset(state.datasets, owner, dataset_id)
    token = uuid.uuid4().hex
    rec, start = complete_dataset(state.datasets, owner, dataset_id, token, state.settings.lease_ttl_s)
    if start:
        state.checker.start(dataset_id, token)
    if rec.state.value == "ready":
        response.status_code = 200
    pub = to_public(rec, request, state.settings)
    response.headers["Location"] = pub.links.self
    return pub


@router.delete("/{dataset_id}", status_code=204, name="delete_dataset",
               responses={404: _E404, 409: {"model": ErrorPublic, "description": "a queued or running job reads "
                                                                                 "it, or it is being validated"}},
               summary="Delete a dataset and its files (refused while a job in flight uses it)")
def delete_dataset(dataset_id: str, state: StateDep, owner: OwnerDep) -> Response:
    load_dataset(state.datasets, owner, dataset_id)
    rec, busy, why = begin_delete(state.datasets, state.store, dataset_id)
    if rec is None:
        raise HTTPException(404, f"no dataset with id {dataset_id!r}")
    if busy:
        more = f" and {len(busy) - 3} more" if len(busy) > 3 else ""
        raise HTTPException(409, f"dataset {dataset_id} is in use by {len(busy)} queued or running job(s) "
                                 f"({', '.join(busy[:3])}{more}); cancel them or wait")
    if why == "validating":
        raise HTTPException(409, f"dataset {dataset_id} is being validated; delete it once it is ready or invalid")
    purge_dataset(state.datasets, state.artifacts, dataset_id)
    return Response(status_code=204)
