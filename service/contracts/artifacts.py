"""The artifact store: a directory shared by the API and every worker.

Uploads, checkpoints and results live here, never in Redis or the broker.
Layout, one folder per job::

    DATA/jobs/<id>/input/        the uploaded files, as received
    DATA/jobs/<id>/checkpoint/   training checkpoints; a redelivered job resumes from them
    DATA/jobs/<id>/output/       models.pipeline's output folder (written atomically), report.html included
    DATA/jobs/<id>/output/aligned.zip   all aligned images, built by the worker
    DATA/jobs/<id>/run.json      what the training child is asked to do
    DATA/jobs/<id>/pair_request.json   a pair job: its pairs, points and options (written by the API)
    DATA/jobs/<id>/child.log     the training child's stderr
    DATA/datasets/<id>/files/    a dataset's files, as uploaded (jobs naming it read them in place)
    DATA/datasets/<id>/names.txt its image names, one a line, written when it was validated

Every path is derived from a job id that must look like one we issued, so a
request path can never point outside the store.
"""
from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

__all__ = ["ArtifactStore", "new_job_id", "valid_job_id", "new_dataset_id", "valid_dataset_id", "RESULT_IMAGES",
           "ARRAY_RESULT_FILES"]

_ID = re.compile(r"[0-9a-f]{32}")  # always fullmatch: '$' would let a trailing newline through
_DATASET_ID = re.compile(r"ds[0-9a-f]{32}")

# Downloadable summary images written by models.pipeline, by their public names.
RESULT_IMAGES = ("mean_before", "var_before", "mean_after", "var_after")
# Per-image array outputs of the job output contract (models/pipeline.py), downloadable as they are.
ARRAY_RESULT_FILES = ("transforms.npy", "per_image.npy", "names.txt")


def new_job_id() -> str:
    return uuid.uuid4().hex


def valid_job_id(job_id: str) -> bool:
    return isinstance(job_id, str) and _ID.fullmatch(job_id) is not None


def new_dataset_id() -> str:
    # Its own shape, so a dataset id is never taken for a job id (or the other way round).
    return "ds" + uuid.uuid4().hex


def valid_dataset_id(dataset_id: str) -> bool:
    return isinstance(dataset_id, str) and bool(_DATASET_ID.fullmatch(dataset_id))


class ArtifactStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    def job_dir(self, job_id: str) -> Path:
        if not valid_job_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.root / "jobs" / job_id

    def input_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "input"

    def checkpoint_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "checkpoint"

    def output_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "output"

    def model_dir(self, job_id: str) -> Path:
        return self.output_dir(job_id) / "model"

    def aligned_zip(self, job_id: str) -> Path:
        return self.output_dir(job_id) / "aligned.zip"

    def run_spec(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "run.json"

    def pair_request(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "pair_request.json"

    def log_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "child.log"

    def result_file(self, job_id: str, name: str) -> Path:
        """``transforms.json``, ``metrics.json``, ``report.html`` or ``<RESULT_IMAGES>.png`` of a finished job."""
        allowed = {"transforms.json", "metrics.json", "report.html", *(f"{n}.png" for n in RESULT_IMAGES)}
        if name not in allowed:
            raise ValueError(f"not a result file: {name!r}")
        return self.output_dir(job_id) / name

    def has_model(self, job_id: str) -> bool:
        return (self.model_dir(job_id) / "pipeline.json").is_file()

    def remove_job(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def dataset_dir(self, dataset_id: str) -> Path:
        if not valid_dataset_id(dataset_id):
            raise ValueError(f"not a dataset id: {dataset_id!r}")
        return self.root / "datasets" / dataset_id

    def dataset_files(self, dataset_id: str) -> Path:
        return self.dataset_dir(dataset_id) / "files"

    def job_input(self, job_id: str, archive: str | None, dataset_id: str | None = None) -> Path:
        """What a job reads: its own ``input/`` (or the one archive or array in it), or the
        files of the dataset it names, in place."""
        base = self.dataset_files(dataset_id) if dataset_id else self.input_dir(job_id)
        return base / archive if archive else base

    def discard_checkpoint(self, job_id: str) -> None:
        shutil.rmtree(self.checkpoint_dir(job_id), ignore_errors=True)
