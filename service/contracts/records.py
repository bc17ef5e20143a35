"""The job record: the one source of truth about a job, kept in the job store.

Celery task ids and results are deliberately not used for state: an unknown
task id reads as PENDING forever and results expire. The API, the worker's
supervisor and the reconciler all read and write this record instead.
"""
from __future__ import annotations

import time
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "JobStatus",
    "JobKind",
    "TERMINAL",
    "METHODS",
    "PAIR_METHODS",
    "METHOD_MAX_IMAGES",
    "WARPS",
    "JobOptions",
    "ProgressRecord",
    "Attempt",
    "JobRecord",
    "now",
]

# Methods the API accepts: the API cannot ask models.methods (torch) itself, so a
# contract test checks that this is exactly the core's registry.
METHODS = ("dense", "dprc", "lsc", "pssv", "rasl", "tgrasta")
# Methods for small collections only, and their largest (models.dense.asic.MAX_IMAGES; a contract
# test checks it): the API refuses a bigger job at once instead of failing it on the worker.
METHOD_MAX_IMAGES = {"dense": 64}
# Pair methods (models.pairwise), checked against the core's "pair" registry the same way.
PAIR_METHODS = ("ecc", "kornia", "learned", "orb", "search", "semantic", "sift")
WARPS = ("translation", "similarity", "affine", "homography")


def now() -> float:
    return time.time()


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})


class JobKind(str, Enum):
    align = "align"  # congeal a collection, train an aligner
    apply = "apply"  # align new images with a trained aligner
    pair = "pair"  # homographies between pairs of images (models.pairwise)


# The DPRC options a client may set (a bounded subset of DPRCConfig in models/dprc.py).
DPRC_FIELDS = ("passes", "moment_weight", "reframe", "width", "batch_size")
# The dense options a client may set (DenseConfig in models/dense/asic.py); the ViT's weights file is
# the operator's (Settings.vit_weights), never a client's path.
DENSE_FIELDS = ("features",)


class JobOptions(BaseModel):
    """What a client may choose for an alignment job. Unknown fields are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal[METHODS] = Field("dprc", description="alignment method")  # type: ignore[valid-type]
    warp: Literal[WARPS] = Field("homography", description="warp family")  # type: ignore[valid-type]
    reference: str | None = Field(None, min_length=1, max_length=1024,
                                  description="name of the reference image; default: chosen automatically")
    budget: int | None = Field(None, ge=1, description="training length: dprc trains until every image has been "
                               "seen this many times; the baselines run this many outer iterations; default: the "
                               "method's own schedule")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    max_side: int = Field(128, ge=8, le=1024, description="longest side of the working size, pixels")
    aligned: Literal["auto", "png", "npy", "none"] = Field(
        "auto", description="aligned images: one PNG each, uint8 .npy shards of 65,536, or none (auto: png up to "
                            "10,000 images, none above; transforms.npy always holds every image's matrix)")
    gpus: int = Field(1, ge=1, le=64, description="GPUs (processes) one job trains on, at most the service's "
                                                  "max_gpus_per_job; dprc only")
    time_limit_s: int | None = Field(None, ge=1, description="fail the job if one attempt runs longer; "
                                                             "default and ceiling: the service's limit")
    # A bounded subset of DPRCConfig (models/dprc.py), for method "dprc" only; the rest stay
    # server-side. Bounds keep one job's cost predictable.
    passes: int | None = Field(None, ge=1, le=4, description="dprc: DeSTNet passes (default 2)")
    moment_weight: float | None = Field(None, ge=0, le=10, description="dprc: moment regulariser weight "
                                        "(default 0; keeps the content at some cost in consistency)")
    reframe: float | None = Field(None, ge=0, le=10, description="dprc: moment weight of the automatic re-fit "
                                  "when the fit crops (default 1; 0: never)")
    width: float | None = Field(None, ge=0.25, le=8, description="dprc: DeSTNet width multiplier (default 4 on a "
                                "GPU for images up to 48 px, whose Table 1 aligner is narrow; 1 above and on a CPU; "
                                "1: Table 1's aligner)")
    batch_size: int | None = Field(None, ge=8, le=8192, description="dprc: training batch size (default 256 on a GPU, "
                                   "64 on a CPU)")

    features: Literal["randconv", "hog", "vit"] | None = Field(
        None, description="dense: the descriptors its pseudo-correspondences come from (default randconv, "
                          "weight-free; vit: the operator's ViT weights, when the service has them)")

    @model_validator(mode="after")
    def _method_fields_need_their_method(self) -> "JobOptions":
        for method, fields in (("dprc", DPRC_FIELDS), ("dense", DENSE_FIELDS)):
            used = [k for k in fields if getattr(self, k) is not None]
            if used and self.method != method:
                raise ValueError(f"{', '.join(used)} apply to method {method} only, not {self.method}")
        return self

    def method_options(self) -> dict[str, Any]:
        """The method options the client set, for ``AlignOptions.method_options``."""
        return {k: getattr(self, k) for k in DPRC_FIELDS + DENSE_FIELDS if getattr(self, k) is not None}



class ProgressRecord(BaseModel):
    """Mirror of :class:`models.methods.Progress` plus when it was written."""

    stage: str
    step: int = 0
    total: int = 0
    epoch: int = 0
    loss: float | None = None
    apsnr: float | None = None
    eta_s: float | None = None
    message: str | None = None
    updated_at: float = Field(default_factory=now)


class Attempt(BaseModel):
    """One run of a job by one worker. A job resumed after a crash has several."""

    n: int
    worker: str
    started_at: float
    ended_at: float | None = None
    outcome: str | None = None  # succeeded / failed / cancelled / lost / interrupted
    pid: int | None = None  # the training child, while it runs
    checkpoint_at_start: bool = False  # a checkpoint from an earlier attempt was present
    first_epoch: int | None = None  # epoch of the first training report of this attempt
    last_epoch: int | None = None
    resumed_from_epoch: int | None = None  # what the method said it resumed from
    detail: str | None = None  # why a lost attempt ended, when known (the signal that killed its process)


class JobRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    kind: JobKind
    owner: str = "anonymous"
    status: JobStatus = JobStatus.queued
    options: JobOptions = Field(default_factory=JobOptions)
    model_id: str | None = None  # apply: the align job whose model is used
    n_inputs: int = 0
    input_bytes: int = 0
    input_archive: str | None = None  # set when the upload was one archive: its file name in input/
    dataset_id: str | None = None  # the job reads this dataset's files (input_archive: one of them)
    idempotency_key: str | None = None
    request_id: str | None = None  # of the request that created it: the worker's log lines carry it too

    created_at: float = Field(default_factory=now)
    updated_at: float = Field(default_factory=now)
    enqueued_at: float | None = None
    resent: int = 0  # times the reconciler sent the task again because the job never started
    started_at: float | None = None
    finished_at: float | None = None

    progress: ProgressRecord | None = None
    cancel_requested: bool = False
    error: str | None = None
    error_kind: str | None = None  # input / internal / time_limit / lost / enqueue
    result: dict[str, Any] | None = None  # small: metrics summary; big artifacts stay on disk

    attempts: list[Attempt] = Field(default_factory=list)
    lease_owner: str | None = None
    lease_expires_at: float | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL
