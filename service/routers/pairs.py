"""``/pairs``: homographies between pairs of images (``models.pairwise``), as jobs; with
``method=semantic``, dense maps between two instances of one category (``models.semantic``): the
job trains on its uploaded images (its collection) unless ``options.model_job`` names an earlier
semantic job whose model to reuse, and its pairs carry a ``warp`` and a ``flow`` download.

``POST /pairs`` takes two images (source first, then target), or many images and a ``pairs``
field saying which go together, and answers at once with a job that runs on a worker like an
alignment job (same queue, cancel, time limit, crash recovery; ``GET /jobs/{id}`` follows it
too). ``GET /pairs/{id}`` adds, once it has succeeded, each pair's matrix (the product's
convention: target pixel -> source pixel), confidence, whether it is aligned, transferred
points and links to its images. ``POST /pairs/{id}/{name}/points`` maps more points, here in
the API process (NumPy; no torch, no worker).
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field, Json, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool

from models.pairwise.dense import dense_transfer
from models.pairwise.points import DIRECTIONS, transfer

from ..bodies import json_body_openapi, read_json_body
from ..contracts import PAIR_METHODS, JobKind, JobRecord, JobStatus
from ..deps import OwnerDep, ServiceState, StateDep, load_job
from ..jobs import accept_job, field_error, multipart_openapi, to_public
from ..schemas import ErrorPublic, JobPublic
from .jobs import IdempotencyKey, dispatch_new, replayed

__all__ = ["router", "PairCreate", "PairJobPublic", "PairPublic", "PointsCreate", "PointsPublic"]

router = APIRouter(prefix="/pairs", tags=["pairs"])

MAX_POINTS = 10_000  # per list of points, in a request or in one pair's spec
PAIR_IMAGES = ("warped", "overlay", "checkerboard", "flow")  # flow: .npy, dense methods only
Point = tuple[float, float]


class PairPoints(BaseModel):
    """Points to transfer: target pixels into the source, source pixels into the target."""

    model_config = ConfigDict(extra="forbid")

    target: list[Point] = Field(default_factory=list, max_length=MAX_POINTS)
    source: list[Point] = Field(default_factory=list, max_length=MAX_POINTS)


class PairSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(min_length=1, max_length=1024, description="an uploaded image's name")
    target: str = Field(min_length=1, max_length=1024)
    name: str | None = Field(None, min_length=1, max_length=100, description="default: 0000, 0001, ...")
    points: PairPoints | None = None

    @classmethod
    def parse(cls, v: Any) -> Any:
        if isinstance(v, (list, tuple)) and len(v) in (2, 3):  # [source, target] or [source, target, name]
            return dict(zip(("source", "target", "name"), v))
        return v


class SearchOptions(BaseModel):
    """The options of the search method a client may set (``models.pairwise.searched.SearchMethodConfig``,
    bounded alike: one job's cost stays predictable)."""

    model_config = ConfigDict(extra="forbid")

    size: int | None = Field(None, ge=16, le=512, description="longer side of the similarity search's level, px "
                                                              "(default 64)")
    candidates: int | None = Field(None, ge=1, le=32, description="similarities refined by block matching (default 6)")
    refine: bool | None = Field(None, description="the dense sub-pixel refinement after the search (default true)")


class LearnedOptions(BaseModel):
    """The options of the learned method a client may set (a bounded subset of
    ``models.pairwise.learned.LearnedConfig``): one job's cost stays predictable."""

    model_config = ConfigDict(extra="forbid")

    search: bool | None = Field(None, description="start from the global search (default true); false: the "
                                                  "paper's multi-start, coarse-to-fine fit from the identity")
    search_joint: bool | None = Field(None, description="after the search, move the homography with the learned "
                                                        "descriptor (default true); false: hold it")
    search_steps: list[Annotated[int, Field(ge=1, le=2000)]] | None = Field(
        None, min_length=1, max_length=5, description="steps after the search, per level, finest last (default [100])")
    starts: int | None = Field(None, ge=1, le=16, description="without the search: initial homographies tried "
                                                              "(default 9)")
    steps: list[Annotated[int, Field(ge=1, le=2000)]] | None = Field(
        None, min_length=1, max_length=5, description="without the search: steps per pyramid level, coarsest first")
    keypoints: int | None = Field(None, ge=8, le=512)
    shared_first_layer: bool | None = Field(None, description="true: fully siamese (same modality); "
                                                              "default false: the first layer is per image")
    patch_warp: Literal["homography", "keypoint"] | None = None
    coarsest: int | None = Field(None, ge=16, le=256, description="without the search: the coarsest level's "
                                                                   "longer side, px")


class SemanticOptions(BaseModel):
    """The options of the semantic method a client may set (bounded: a job's training cost stays
    predictable). Without ``model_job`` the job trains on its own uploaded images."""

    model_config = ConfigDict(extra="forbid")

    model_job: str | None = Field(None, min_length=1, max_length=100,
                                  description="an earlier succeeded semantic pair job of yours: reuse its trained "
                                              "model instead of training")
    synthetic_steps: int | None = Field(None, ge=0, le=5000, description="self-supervised steps (default 600)")
    weak_steps: int | None = Field(None, ge=0, le=2000, description="weakly supervised (soft-inlier) steps (default 0; "
                                                                            "docs/semantic.md)")
    batch: int | None = Field(None, ge=2, le=128)
    size: int | None = Field(None, ge=16, le=128, description="the network's input side (default 48)")


_OPTIONS = {"search": SearchOptions, "learned": LearnedOptions, "semantic": SemanticOptions}


class PairCreate(BaseModel):
    """Options of ``POST /pairs``, as multipart form fields beside the images. ``pairs``, ``points``
    and ``options`` are JSON text."""

    model_config = ConfigDict(extra="forbid")

    method: Literal[PAIR_METHODS] = Field(  # type: ignore[valid-type]
        "search", description="search (default: a global search on gradient orientations and a sub-pixel "
                              "refinement, no network), learned (the search, then a descriptor learned on the pair "
                              "moves the homography with it), or a reference: sift, orb, ecc, kornia (if the worker "
                              "has them); semantic: dense maps between two instances of one category")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    max_side: int = Field(256, ge=16, le=1024, description="longest side of each image's working size")
    min_confidence: float | None = Field(None, ge=0, le=1, description="aligned from this confidence on; "
                                         "default: the method's threshold")
    pairs: Json[list[PairSpec]] | None = Field(
        None, description='JSON: [["a.png", "b.png"], ["a.png", "c.png", "name"], {"source": ..., "target": ..., '
                          '"name": ..., "points": {"target": [[x, y]], "source": [[x, y]]}}]; default with two '
                          'images: the first uploaded is the source, the second the target')
    points: Json[PairPoints] | None = Field(None, description='JSON: {"target": [[x, y], ...], "source": [...]}, '
                                                             'transferred for every pair')
    options: Json[SearchOptions | LearnedOptions | SemanticOptions] | None = Field(
        None, description="JSON: options of the search, the learned or the semantic method")

    @field_validator("pairs", mode="before")
    @classmethod
    def _pair_lists(cls, v):
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except ValueError:
                return v  # the Json type reports it
            if isinstance(v, list):
                return json.dumps([PairSpec.parse(x) for x in v])
        return v


class PairPointsPublic(BaseModel):
    target: list[list[float] | None] = Field(description="target pixels as given")
    target_in_source: list[list[float] | None] = Field(description="where they lie in the source (null: at "
                                                                   "infinity)")
    source: list[list[float] | None]
    source_in_target: list[list[float] | None]


class PairPublic(BaseModel):
    name: str
    source: str | None = Field(description="the source image's name")
    target: str | None
    source_size: list[int] = Field(description="(H, W)")
    target_size: list[int]
    matrix: list[list[float]] | None = Field(description="3x3, target pixel -> source pixel (see 'convention'); "
                                                         "null when the method found nothing")
    confidence: float = Field(description="0-1, in the method's terms (search, learned: about the share of the "
                                          "target's textured blocks that, matched on their own, agree with the "
                                          "homography to within a pixel)")
    aligned: bool = Field(description="confidence at or above the threshold; false: treat the matrix as a guess")
    warp: dict[str, Any] | None = Field(None, description="dense methods (semantic): target pixel -> source pixel "
                                        "as post @ tps(pre @ p) (docs/semantic.md); 'matrix' is then its affine stage")
    points: PairPointsPublic | None = None
    links: dict[str, str] = Field(description="warped, overlay, checkerboard (aligned pairs), flow (dense "
                                              "methods: .npy, (H, W, 2) source pixel of each target pixel), points")


class PairJobPublic(BaseModel):
    job: JobPublic
    method: str | None = None
    convention: str | None = Field(None, description="once succeeded: how to read 'matrix'")
    n_pairs: int | None = None
    n_aligned: int | None = None
    model_job: str | None = Field(None, description="a job that trained a pair model (semantic): this job's id, to "
                                                    "pass as options.model_job")
    pairs: list[PairPublic] | None = Field(None, description="once succeeded")


class PointsCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    points: list[Point] = Field(min_length=1, max_length=MAX_POINTS, description="[[x, y], ...] in pixels")
    direction: Literal[DIRECTIONS] = Field("target_to_source")  # type: ignore[valid-type]


class PointsPublic(BaseModel):
    direction: str
    points: list[list[float] | None] = Field(description="mapped points; null where a point goes to infinity")


_ERRORS = {404: {"model": ErrorPublic, "description": "no such pair job"},
           409: {"model": ErrorPublic, "description": "the job has not succeeded"},
           413: {"model": ErrorPublic, "description": "upload, image or pair count above a limit"},
           422: {"model": ErrorPublic, "description": "bad file, option or pair; the message names it"}}


def _reuse_model(state: ServiceState, owner: str, method_options: dict) -> dict:
    """``model_job`` -> ``model``: the folder of that job's trained pair model in the artifact store."""
    other = dict(method_options)
    job_id = other.pop("model_job")
    if set(other):
        raise field_error("options", f"model_job reuses a trained model as it is: drop {', '.join(sorted(other))}")
    try:
        rec = load_job(state, owner, job_id)
    except HTTPException:
        raise field_error("options", f"model_job {job_id!r}: no such job of yours") from None
    if rec.kind != JobKind.pair or rec.status != JobStatus.succeeded:
        raise field_error("options", f"model_job {job_id!r}: not a succeeded pair job")
    model_dir = state.artifacts.model_dir(rec.id)
    if not (model_dir / "semantic.safetensors").is_file():
        raise field_error("options", f"model_job {job_id!r}: that job left no pair model (it did not train one)")
    return {"model": str(model_dir)}


def _prepare(state: ServiceState, owner: str):
    """Checks a request's pairs against its uploaded images and writes ``pair_request.json``."""

    def prepare(opts: PairCreate, names: list[str], job_id: str) -> None:
        if opts.pairs is None:
            if len(names) != 2:
                raise field_error("pairs", f"{len(names)} images uploaded: say which go together in 'pairs' "
                                           f"(without it, send exactly two: the source, then the target)")
            specs = [PairSpec(source=names[0], target=names[1], name="pair")]
        else:
            specs = opts.pairs
        if not specs:
            raise field_error("pairs", "no pairs")
        if len(specs) > state.settings.max_pairs_per_job:
            raise HTTPException(413, f"{len(specs)} pairs, above the limit of {state.settings.max_pairs_per_job} "
                                     f"per job")
        known = set(names)
        for i, p in enumerate(specs):
            for side in ("source", "target"):
                if getattr(p, side) not in known:
                    raise field_error("pairs", f"pair {i}: {side} {getattr(p, side)!r} is not the name of an "
                                               f"uploaded image")
        method_options = {}
        if opts.options is not None:
            if opts.method not in _OPTIONS:
                raise field_error("options", f"options apply to methods {', '.join(_OPTIONS)} only, not {opts.method}")
            try:
                method_options = _OPTIONS[opts.method].model_validate(opts.options.model_dump(exclude_none=True)) \
                    .model_dump(exclude_none=True)
            except ValidationError as e:
                raise field_error("options", f"not options of method {opts.method}: "
                                             f"{'; '.join(err['msg'] + ' at ' + '.'.join(map(str, err['loc'])) for err in e.errors())}") from None
        if "model_job" in method_options:
            method_options = _reuse_model(state, owner, method_options)
        shared = opts.points.model_dump() if opts.points is not None else None
        request = {
            "options": {"method": opts.method, "seed": opts.seed, "max_side": opts.max_side,
                        "min_confidence": opts.min_confidence, "method_options": method_options},
            "pairs": [[p.source, p.target, p.name or ""] for p in specs],
            "points": [p.points.model_dump() if p.points is not None else shared for p in specs],
        }
        path = state.artifacts.pair_request(job_id)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(request))
        tmp.replace(path)

    return prepare


@router.post(
    "", status_code=202, response_model=PairJobPublic, name="create_pair_job",
    summary="Upload two images (or many and the pairs among them) and estimate their homographies "
            "(or, method semantic, their dense maps)",
    responses={**_ERRORS, 202: {"description": "accepted; poll the 'Location'",
                                "headers": {"Location": {"schema": {"type": "string"}}}}},
    openapi_extra=multipart_openapi(PairCreate, "the images (PNG, JPEG, TIFF, BMP), or one .zip/.tar[.gz] archive "
                                                "of them: two (source, then target) or any number with 'pairs'"),
)
async def create_pair_job(request: Request, response: Response, state: StateDep, owner: OwnerDep,
                          idempotency_key: IdempotencyKey = None) -> PairJobPublic:
    """The images are streamed to the artifact store and checked, the pairs checked against them,
    and the job queued; the answer comes at once."""
    rec = await replayed(state, owner, idempotency_key, JobKind.pair)
    created = False
    if rec is None:
        rec, created = await accept_job(request, state, owner, kind=JobKind.pair, options_model=PairCreate,
                                        min_images=2, idempotency_key=idempotency_key, prepare=_prepare(state, owner))
        if created:
            await run_in_threadpool(dispatch_new, state, rec)
            rec = await run_in_threadpool(state.store.get, rec.id) or rec
    response.headers["Location"] = request.app.url_path_for("get_pair_job", job_id=rec.id)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return PairJobPublic(job=to_public(rec, request))


def _pair_job(state: ServiceState, owner: str, job_id: str) -> JobRecord:
    rec = load_job(state, owner, job_id)
    if rec.kind != JobKind.pair:
        raise HTTPException(404, f"no pair job with id {job_id!r} (that is an {rec.kind.value} job)")
    return rec


def _results(state: ServiceState, rec: JobRecord) -> dict:
    try:
        return json.loads((state.artifacts.output_dir(rec.id) / "pairs.json").read_text())
    except (OSError, ValueError):
        raise HTTPException(404, "pairs.json is missing from the artifact store") from None


def _finished(state: ServiceState, owner: str, job_id: str) -> tuple[JobRecord, dict]:
    rec = _pair_job(state, owner, job_id)
    if rec.status != JobStatus.succeeded:
        raise HTTPException(409, f"job {job_id} is {rec.status.value}; results exist once it has succeeded")
    return rec, _results(state, rec)


def _entry(doc: dict, name: str) -> dict:
    for e in doc["pairs"]:
        if e["name"] == name:
            return e
    raise HTTPException(404, f"no pair named {name!r} in this job")


@router.get("/{job_id}", response_model=PairJobPublic, name="get_pair_job", responses=_ERRORS,
            summary="A pair job: its status, and once succeeded every pair's matrix, confidence and links")
def get_pair_job(job_id: str, request: Request, state: StateDep, owner: OwnerDep) -> PairJobPublic:
    rec = _pair_job(state, owner, job_id)
    pub = PairJobPublic(job=to_public(rec, request))
    if rec.status != JobStatus.succeeded:
        return pub
    doc = _results(state, rec)
    path = request.app.url_path_for
    pairs = []
    for e in doc["pairs"]:
        links = {k: path("download_pair_image", job_id=job_id, name=e["name"], image=k) for k in e.get("files", {})}
        links["points"] = path("transfer_pair_points", job_id=job_id, name=e["name"])
        pairs.append(PairPublic(name=e["name"], source=e.get("source_name"), target=e.get("target_name"),
                                source_size=e["source_size"], target_size=e["target_size"], matrix=e["matrix"],
                                confidence=e["confidence"], aligned=e["aligned"], warp=e.get("warp"),
                                points=e.get("points"), links=links))
    return pub.model_copy(update=dict(method=doc.get("method"), convention=doc["convention"], n_pairs=doc["n_pairs"],
                                      n_aligned=doc["n_aligned"], pairs=pairs,
                                      model_job=job_id if doc.get("model") else None))


@router.get("/{job_id}/{name}/{image}", name="download_pair_image", response_class=FileResponse,
            responses={**_ERRORS, 200: {"content": {"image/png": {}, "application/octet-stream": {}}}},
            summary="A pair's warped source, overlay or checkerboard (PNG; aligned pairs only), or its flow "
                    "(NumPy .npy; dense methods)")
def download_pair_image(job_id: str, name: str, image: Literal[PAIR_IMAGES], state: StateDep,  # type: ignore[valid-type]
                        owner: OwnerDep):
    rec, doc = _finished(state, owner, job_id)
    rel = _entry(doc, name).get("files", {}).get(image)
    if rel is None:
        raise HTTPException(404, f"pair {name!r} has no {image} image (it was not aligned)")
    out = state.artifacts.output_dir(rec.id).resolve()
    path = (out / rel).resolve()
    if out not in path.parents or not path.is_file():  # a hand-edited pairs.json must not leak files
        raise HTTPException(404, f"{image} of pair {name!r} is missing from the artifact store")
    if image == "flow":
        return FileResponse(path, media_type="application/octet-stream", filename=f"{name}-flow.npy")
    return FileResponse(path, media_type="image/png")


@router.post("/{job_id}/{name}/points", response_model=PointsPublic, name="transfer_pair_points",
             responses={**_ERRORS, 415: {"model": ErrorPublic}}, openapi_extra=json_body_openapi(PointsCreate),
             summary="Map points between a pair's images with its homography")
async def transfer_pair_points(job_id: str, name: str, request: Request, state: StateDep,
                               owner: OwnerDep) -> PointsPublic:
    """``{"points": [[x, y], ...], "direction": "target_to_source"}``: ``target_to_source`` maps target
    pixels into the source (with the matrix), ``source_to_target`` the other way (with its inverse)."""
    body = await read_json_body(request, PointsCreate, 64 * MAX_POINTS + 1024,
                                '{"points": [[x, y], ...], "direction": "target_to_source"}')
    return await run_in_threadpool(_transfer, state, owner, job_id, name, body)


def _transfer(state: ServiceState, owner: str, job_id: str, name: str, body: PointsCreate) -> PointsPublic:
    _, doc = _finished(state, owner, job_id)
    e = _entry(doc, name)
    if e["matrix"] is None:
        raise HTTPException(409, f"pair {name!r} has no homography (the method found nothing)")
    if e.get("warp") is not None:  # a dense method: its full map (NumPy; nan where a point is not reached)
        out = dense_transfer(e["warp"], body.points, body.direction)
    else:
        out = transfer(e["matrix"], body.points, body.direction)
    return PointsPublic(direction=body.direction,
                        points=[None if any(v != v for v in q) else [float(q[0]), float(q[1])] for q in out])
