"""Request and response schemas of the HTTP API (pydantic v2), named by role."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .contracts import JobKind, JobOptions, JobStatus

__all__ = [
    "JobCreate",
    "ProgressPublic",
    "ResidualSummary",
    "MetricsPublic",
    "AttemptPublic",
    "JobLinks",
    "JobPublic",
    "JobsPublic",
    "TransformPublic",
    "AlignmentPublic",
    "ModelPublic",
    "ErrorPublic",
    "ServerErrorPublic",
    "AUTH_ERRORS",
    "SERVER_ERRORS",
    "HealthPublic",
    "DatasetFileCreate",
    "DatasetCreate",
    "DatasetFilePublic",
    "DatasetLinks",
    "DatasetPublic",
    "DatasetsPublic",
    "PerImagePublic",
    "PerImagePage",
    "ReadyPublic",
    "GalleryItemPublic",
    "GalleryPage",
    "CheckPublic",
    "SummaryPublic",
    "ts",
]


def ts(t: float | None) -> datetime | None:
    return None if t is None else datetime.fromtimestamp(t, tz=timezone.utc)


class JobCreate(JobOptions):
    """Options of ``POST /jobs``, sent as multipart form fields beside the files.

    Unknown fields are rejected (422 naming the field) rather than ignored, so a
    misspelt option never silently falls back to its default.
    """

    dataset: str | None = Field(None, min_length=1, max_length=64,
                                description="id of a ready dataset (POST /datasets) to align, instead of "
                                            "file parts; the job reads its files in place")


class ProgressPublic(BaseModel):
    stage: str = Field(description="starting, loading, training, aligning, writing, done, queued, cancelled")
    step: int = Field(description="steps done in this stage")
    total: int = Field(description="steps in this stage; 0 when unknown")
    epoch: int
    loss: float | None = None
    apsnr: float | None = Field(None, description="running APSNR of the last aligned batch, dB")
    eta_s: float | None = Field(None, description="estimated seconds left in this stage")
    message: str | None = None
    updated_at: datetime


class ResidualSummary(BaseModel):
    mean: float
    median: float
    p95: float
    max: float
    n_outliers: int


class FramingSummary(BaseModel):
    content_kept_median: float | None = Field(None, description="median fraction of each image's content "
                                              "inside its aligned frame")
    content_kept_p10: float | None = None
    area_scale_median: float | None = Field(None, description="input area per output pixel at the frame centre")
    n_cropped: int = Field(0, description="images whose aligned frame keeps less than 0.85 of their content")
    n_lost: int | None = Field(None, description="images whose aligned frame lost the object: it keeps less than "
                               "half of it, or shows it at more than 6 times or less than 1/6 of its area "
                               "(null in outputs written before this count existed)")
    n_fallback: int | None = Field(None, description="images whose learned warp strayed (the aligned frame's centre "
                                   "off the image, a corner behind the horizon, or the object's scale changed more "
                                   "than 6-fold) and that got the initial moment alignment instead; null where the "
                                   "method does not check")
    n_touching_edge: int | None = Field(None, description="images whose object touches their own border (part "
                                        "of it may lie outside the image); null where the images' borders are "
                                        "not plain background and the check is off")


class ConsistencySummary(BaseModel):
    probe_sigma: float = Field(description="size of the known random perturbation each image is re-warped by")
    moved_median_px: float = Field(description="median distance the aligned frame's corners move under it, px")
    probe_median_px: float = Field(description="median distance the perturbation itself moves the corners, px")
    ratio: float = Field(description="mean moved / mean probe at the frame's corners: 0 perfectly "
                                     "self-consistent, 1 no better than not aligning (grows with the frame)")
    object_ratio: float | None = Field(None, description="the same probe measured at each image's object pixels, "
                                       "on object_sample evenly spaced images: what the consistency warning "
                                       "reads (above 0.25); frame-free")
    object_sample: int | None = Field(None, description="how many images object_ratio was measured on")


class MetricsPublic(BaseModel):
    model_config = ConfigDict(extra="allow")

    n_images: int
    apsnr_before: float | None = Field(None, description="APSNR of the unaligned collection, dB")
    apsnr_after: float | None = Field(None, description="APSNR after alignment, dB")
    residual_summary: ResidualSummary | None = None
    framing_summary: FramingSummary | None = None
    consistency_summary: ConsistencySummary | None = None
    warnings: list[str] = Field(default_factory=list, description="degenerate alignments detected "
                                "without ground truth (cropping, shrinking, an aligner that is not self-consistent)")
    seconds: float | None = None
    output_size: list[int] | None = None
    reference: str | None = None
    notes: list[str] = Field(default_factory=list)


class AttemptPublic(BaseModel):
    n: int
    worker: str
    started_at: datetime
    ended_at: datetime | None = None
    outcome: str | None = Field(None, description="succeeded, failed, cancelled, lost (its worker died) or "
                                                   "interrupted (its worker shut down)")
    checkpoint_at_start: bool = Field(description="a checkpoint of an earlier attempt was there to resume from")
    first_epoch: int | None = None
    last_epoch: int | None = None
    resumed_from_epoch: int | None = None
    detail: str | None = Field(None, description="why a lost attempt ended, when known (e.g. the signal that "
                                                  "killed its training process)")


class JobLinks(BaseModel):
    self: str
    cancel: str | None = None
    transforms: str | None = None
    metrics: str | None = None
    report: str | None = Field(None, description="the job's report: a self-contained HTML page to look at "
                                                 "(checks, warnings, mean/variance, training curve, images by "
                                                 "residual), when the output has it")
    aligned_zip: str | None = None
    aligned_image: str | None = Field(None, description="template: replace {name} by an input image's name")
    mean_before: str | None = None
    var_before: str | None = None
    mean_after: str | None = None
    var_after: str | None = None
    model: str | None = None
    model_download: str | None = Field(None, description="the trained model's folder as one zip")
    align_with_model: str | None = None
    per_image: str | None = Field(None, description="paged per-image results (JSON)")
    gallery: str | None = Field(None, description="the per-image results ranked by residual, largest first, "
                                                  "with input and aligned image links (what the web page shows)")
    summary: str | None = Field(None, description="the checks and warnings in words, APSNR, mean/variance links")
    transforms_npy: str | None = Field(None, description="every matrix, float64 (N, 3, 3), when the output has it")
    per_image_npy: str | None = Field(None, description="per-image metrics, a structured array, when the output "
                                                        "has it")
    names_txt: str | None = Field(None, description="image names, one a line, in index order, when the output "
                                                    "has it")
    dataset: str | None = Field(None, description="the dataset the job read")
    pairs: str | None = Field(None, description="a pair job: its results (matrices, confidence, images)")


class JobPublic(BaseModel):
    id: str
    kind: JobKind
    status: JobStatus
    options: JobOptions | None = Field(None, description="align jobs: the options; inference and pair jobs: none")
    n_images: int
    model_id: str | None = Field(None, description="align: the id of the trained model, once succeeded; "
                                                   "apply: the model used")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime
    progress: ProgressPublic | None = None
    cancel_requested: bool = False
    error: str | None = None
    error_type: str | None = Field(None, description="input, internal, time_limit, lost")
    metrics: MetricsPublic | None = None
    attempts: list[AttemptPublic] = Field(default_factory=list)
    links: JobLinks


class JobsPublic(BaseModel):
    data: list[JobPublic]
    total: int
    offset: int
    limit: int
    next: str | None = Field(None, description="the next page, if any")


class TransformPublic(BaseModel):
    name: str
    aligned_file: str
    input_size: list[int]
    matrix: list[list[float]] = Field(description="3x3; see 'convention'")
    fill: list[float]
    url: str = Field(description="the aligned image")
    png_base64: str | None = None


class AlignmentPublic(BaseModel):
    """Synchronous inference: the transforms themselves, not only links to them."""

    job: JobPublic
    convention: str
    output_size: list[int]
    images: list[TransformPublic]


class ModelPublic(BaseModel):
    id: str
    job: str = Field(description="the training job")
    method: str
    warp: str
    working_size: list[int]
    channels: int
    created_at: datetime
    links: dict[str, str]


class ErrorPublic(BaseModel):
    detail: Any = Field(description="what is wrong; for 422 on fields, a list naming each field")


class ServerErrorPublic(BaseModel):
    detail: str
    error_id: str = Field(description="find the traceback in the API's log by this id")


_HEADER = {"schema": {"type": "string"}}
# Answers any route behind an API key may give, whatever it does (see service.deps.get_owner).
AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorPublic, "description": "missing or invalid API key",
          "headers": {"WWW-Authenticate": {**_HEADER, "description": 'Bearer realm="congeal"'}}},
    429: {"model": ErrorPublic, "description": "over the tenant's request rate; for a new job, over its jobs "
                                               "in flight; for a new dataset, over the datasets it may hold",
          "headers": {"Retry-After": {"schema": {"type": "integer"},
                                      "description": "seconds to wait (not sent for the dataset limit: delete one)"}}},
}
# Answers any route may give when something is wrong on the server's side.
SERVER_ERRORS: dict[int | str, dict[str, Any]] = {
    500: {"model": ServerErrorPublic, "description": "an unexpected error (a bug); the body has an id to report"},
    503: {"model": ServerErrorPublic, "description": "the job store is unreachable; try again shortly"},
}


class HealthPublic(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyPublic(BaseModel):
    status: Literal["ready", "not ready"]
    mode: Literal["redis", "embedded"]
    store: str
    workers: list[str]
    detail: str | None = None


# ---------------------------------------------------------------------- datasets


class DatasetFileCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=255, description="a plain file name (no folders): an image, one "
                      ".zip/.tar[.gz] archive or .npy array, or one of several .npy/.npz or .tar/.zip shards")
    size: int | None = Field(None, ge=0, description="bytes; if left out, the first chunk's Content-Range total "
                             "fixes it")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="checked when the dataset is completed")


class DatasetCreate(BaseModel):
    """``POST /datasets``: the files to come. Nothing is uploaded yet."""

    model_config = ConfigDict(extra="forbid")

    files: list[DatasetFileCreate] = Field(min_length=1)
    label: str | None = Field(None, max_length=200, description="a name for people; not unique")


class DatasetFilePublic(BaseModel):
    name: str
    size: int | None
    received: int = Field(description="bytes received from offset 0: the next chunk starts here")
    complete: bool
    sha256: str | None = None


class DatasetLinks(BaseModel):
    self: str
    delete: str
    upload: str | None = Field(None, description="template: PUT chunks of a file here (replace {name})")
    complete: str | None = None


class DatasetPublic(BaseModel):
    id: str
    label: str | None = None
    state: Literal["uploading", "validating", "ready", "invalid"]
    layout: str = Field(description="images (a folder of image files), bundle (one archive or .npy), shards")
    n_files: int
    bytes_declared: int = Field(description="sum of the file sizes known so far")
    bytes_received: int | None = Field(None, description="on GET /datasets/{id}")
    files: list[DatasetFilePublic] | None = Field(None, description="on GET /datasets/{id}, by name")
    n_images: int | None = Field(None, description="once ready")
    image_size: list[int] | None = Field(None, description="(H, W) when every image has it")
    channels: int | None = None
    error: str | None = Field(None, description="invalid: why")
    error_status: int | None = Field(None, description="invalid: 413 (over a limit) or 422")
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None = None
    expires_at: datetime | None = Field(None, description="deleted then unless a job in flight reads it; each "
                                        "use (a chunk, a job naming it) moves it later")
    jobs_in_flight: list[str] | None = Field(None, description="on GET /datasets/{id}: queued or running jobs "
                                             "that read it (it cannot be deleted meanwhile)")
    links: DatasetLinks


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    total: int
    offset: int
    limit: int
    next: str | None = None


# ---------------------------------------------------------------------- paged per-image results


class PerImagePublic(BaseModel):
    index: int
    name: str
    matrix: list[list[float]] = Field(description="3x3, aligned-output pixel -> input pixel (see the job's "
                                                  "transforms 'convention')")
    fill: list[float] | None = Field(None, description="per channel, 0-255")
    input_size: list[int] | None = Field(None, description="(H, W) of the input image")
    residual: float | None = None
    outlier: bool | None = None
    content_kept: float | None = None
    area_scale: float | None = None
    edge_contact: float | None = None
    touches_edge: bool | None = Field(None, description="null where the border check is off")
    consistency_px: float | None = Field(None, description="null where not measured")
    fallback: bool | None = Field(None, description="the learned warp strayed and this image got the initial "
                                  "(moment) alignment instead; null where the method does not check")
    aligned_url: str | None = Field(None, description="the aligned PNG, where the job wrote PNGs")


class PerImagePage(BaseModel):
    data: list[PerImagePublic]
    total: int
    offset: int
    limit: int
    next: str | None = None
    source: Literal["arrays", "json"] = Field(description="arrays: transforms.npy / per_image.npy / names.txt; "
                                              "json: transforms.json and metrics.json (outputs without arrays)")


# ---------------------------------------------------------------------- what the web page shows


class GalleryItemPublic(PerImagePublic):
    rank: int = Field(description="position by residual, 0 = largest")
    input_url: str = Field(description="the input image as a small PNG (GET /jobs/{id}/inputs/{name})")


class GalleryPage(BaseModel):
    """Per-image results ordered by residual, largest first: outliers lead."""

    data: list[GalleryItemPublic]
    total: int
    offset: int
    limit: int
    next: str | None = None
    order: Literal["residual_desc"] = "residual_desc"


class CheckPublic(BaseModel):
    name: str
    value: str = Field(description="the measure, in words")
    meaning: str = Field(description="what it means")


class SummaryPublic(BaseModel):
    """A finished job's result at a glance: the report's checks and warnings in words
    (models/report.py) and the mean/variance images before and after."""

    n_images: int
    method: str | None = None
    warp: str | None = None
    apsnr_before: float | None = None
    apsnr_after: float | None = None
    checks: list[CheckPublic]
    warnings: list[str] = Field(description="empty: every framing and consistency check is within its limits")
    notes: list[str] = Field(default_factory=list)
    images: dict[str, str] = Field(description="mean_before, mean_after, var_before, var_after: PNG links")
