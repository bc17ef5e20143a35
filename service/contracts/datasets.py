"""Datasets: collections uploaded once, in resumable chunks, that several jobs name.

A dataset is a record (owner, state, layout) plus one small record per file (declared size,
bytes received, who is writing it now), kept in the job store's Redis or SQLite beside the
jobs (:class:`DatasetStore` here; the backends in :mod:`.redis_store` and :mod:`.sqlite_store`),
and its files in the artifact store (``DATA/datasets/<id>/files/``). Per-file records are
kept apart from the dataset's so that a chunk of one file rewrites a few hundred bytes, not a
record listing 10,000 files.

Life cycle: ``uploading`` (chunks arrive; any order of files, each file in order) ->
``validating`` (every byte is there; a checker process reads it all) -> ``ready`` (frozen;
jobs may name it) or ``invalid`` (with the reason). Deleting marks the record first, so a
crash half-way leaves a record that the sweep finishes.

Jobs that name a dataset are its *users* (job id -> when it was named). A dataset with a user
that is queued or running cannot be deleted, by a client or by the retention sweep. Shared by
the API and the workers; no FastAPI, no torch.
"""
from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from enum import Enum
from pathlib import PurePosixPath
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field

from .artifacts import ArtifactStore
from .records import now

__all__ = [
    "DatasetState",
    "DatasetFile",
    "DatasetRecord",
    "DatasetStore",
    "DatasetQuota",
    "DatasetUnavailable",
    "DATASET_IMAGE_EXTENSIONS",
    "check_file_name",
    "classify_files",
    "jobs_in_flight",
    "use_dataset",
    "release_use",
    "begin_delete",
    "purge_dataset",
    "sweep_datasets",
    "USER_GRACE_S",
]

# A job named the dataset this long ago and still has no record: its insert may be under way,
# so it counts as in flight. Longer than any insert takes; short enough not to pin a dataset.
USER_GRACE_S = 300.0

DATASET_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_ARRAYS = (".npy", ".npz")
_SHARD_ARCHIVES = (".tar", ".zip")
_BUNDLES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".npy")


class DatasetState(str, Enum):
    uploading = "uploading"
    validating = "validating"
    ready = "ready"
    invalid = "invalid"


class DatasetFile(BaseModel):
    """One file of a dataset and how much of it has arrived."""

    model_config = ConfigDict(extra="ignore")

    name: str
    size: int | None = None  # declared at creation, or fixed by the first chunk's Content-Range
    received: int = 0  # bytes on disk, from offset 0: the next chunk starts here
    sha256: str | None = None  # optional, declared: checked when the dataset is completed
    writer: str | None = None  # the request writing a chunk now (a lease, so a dead one lapses)
    writer_until: float | None = None

    @property
    def complete(self) -> bool:
        return self.size is not None and self.received == self.size


class DatasetRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    owner: str = "anonymous"
    label: str | None = None
    state: DatasetState = DatasetState.uploading
    n_files: int = 0
    bytes_declared: int = 0  # sum of the sizes known so far (the byte limit is checked on it)
    layout: str = "images"  # images (a folder of them), bundle (one archive or .npy), shards
    input_name: str | None = None  # bundle: the one file a job reads; else the folder
    created_at: float = Field(default_factory=now)
    updated_at: float = Field(default_factory=now)
    last_used_at: float = Field(default_factory=now)
    completed_at: float | None = None
    check_holder: str | None = None  # the validation running now (a lease, renewed while it runs)
    check_until: float | None = None
    error: str | None = None
    error_status: int | None = None  # invalid: 413 (over a limit) or 422
    n_images: int | None = None
    image_size: list[int] | None = None  # (H, W) when every image has it
    channels: int | None = None
    users: dict[str, float] = Field(default_factory=dict)  # job id -> when it named the dataset
    deleting: bool = False


class DatasetQuota(Exception):
    """``insert`` refused: the owner already holds ``count`` datasets."""

    def __init__(self, count: int):
        super().__init__(f"{count} datasets")
        self.count = count


class DatasetUnavailable(Exception):
    """A job cannot use the dataset; ``status`` is the HTTP status the API answers."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ---------------------------------------------------------------------- naming and layout


def check_file_name(raw: str) -> str | None:
    """Why ``raw`` cannot name a dataset file, or None. Names are plain base names: a dataset
    is a flat folder, and the name becomes a path there."""
    if not isinstance(raw, str) or not raw or raw != raw.strip():
        return "file names must be non-empty, without leading or trailing spaces"
    if "/" in raw or "\\" in raw or raw in (".", "..") or PurePosixPath(raw).name != raw:
        return f"{raw!r}: a file name, not a path (no '/' or '\\\\')"
    if raw.startswith(".") or any(ord(c) < 32 or c == "\x7f" for c in raw) or len(raw.encode()) > 255:
        return f"{raw!r}: file names must be visible (no leading '.'), printable and at most 255 bytes"
    low = raw.lower()
    if not low.endswith(DATASET_IMAGE_EXTENSIONS + _ARRAYS + _BUNDLES):
        return (f"{raw!r}: not an accepted file (images: {', '.join(e[1:] for e in DATASET_IMAGE_EXTENSIONS)}; "
                f"one .zip/.tar[.gz] archive or one .npy array; or .npy/.npz or .tar/.zip shards)")
    return None


def classify_files(names: list[str]) -> tuple[str, str | None]:
    """The layout of a dataset with these files, and the file a job reads (None: the folder).

    Raises ``ValueError`` naming the problem for a mixture no reader accepts.
    """
    low = [n.lower() for n in names]
    if not names:
        raise ValueError("a dataset needs at least one file")
    if all(n.endswith(DATASET_IMAGE_EXTENSIONS) for n in low):
        return "images", None
    if len(names) == 1 and low[0].endswith(_BUNDLES):
        return "bundle", names[0]
    if all(n.endswith(_ARRAYS) for n in low):
        return "shards", None
    if all(n.endswith(_SHARD_ARCHIVES) for n in low):
        return "shards", None
    kinds = sorted({PurePosixPath(n).suffix or n for n in low})
    raise ValueError(f"these files do not make one collection ({', '.join(kinds)}): send image files, one "
                     f"archive or .npy, .npy/.npz shards, or .tar/.zip shards")


# ---------------------------------------------------------------------- stores

# fn(record, files) -> None (change nothing) or (new record or None, {name: new file} or None)
Transaction = Callable[[DatasetRecord, dict[str, DatasetFile]],
                       "tuple[DatasetRecord | None, dict[str, DatasetFile] | None] | None"]


class DatasetStore(ABC):
    @abstractmethod
    def insert(self, rec: DatasetRecord, files: list[DatasetFile], max_per_owner: int | None = None) -> None:
        """Store a new dataset and its files; :class:`DatasetQuota` if the owner holds
        ``max_per_owner`` already (counted and inserted in one atomic step)."""

    @abstractmethod
    def get(self, dataset_id: str) -> DatasetRecord | None: ...

    @abstractmethod
    def files(self, dataset_id: str, names: list[str] | None = None) -> dict[str, DatasetFile]:
        """The dataset's files by name (only ``names``, if given)."""

    @abstractmethod
    def transact(self, dataset_id: str, fn: Transaction, names: list[str] | None = ()) \
            -> tuple[DatasetRecord | None, dict[str, DatasetFile], bool]:
        """Atomically read the record and the files ``names`` (``None``: all of them), apply
        ``fn``, write what it returns. Returns the record and files as stored afterwards
        (``None`` record: no such dataset) and whether anything changed."""

    @abstractmethod
    def list(self, owner: str, offset: int, limit: int) -> tuple[list[DatasetRecord], int]:
        """The owner's datasets, newest first, and how many there are."""

    @abstractmethod
    def all_ids(self) -> list[str]: ...

    @abstractmethod
    def delete(self, dataset_id: str) -> None:
        """Forget a dataset and its file records (its files are the artifact store's)."""

    def update(self, dataset_id: str, fn: Callable[[DatasetRecord], DatasetRecord | None]) \
            -> tuple[DatasetRecord | None, bool]:
        def t(rec, _files):
            new = fn(rec)
            return None if new is None else (new, None)

        rec, _, changed = self.transact(dataset_id, t)
        return rec, changed

    def close(self) -> None:  # pragma: no cover - trivial
        pass


# ---------------------------------------------------------------------- jobs that use a dataset


def _user_state(jobs, users: dict[str, float], t: float) -> tuple[list[str], list[str]]:
    """``(in flight, finished or gone)`` among a dataset's users, read from the job store."""
    busy, done = [], []
    for jid, named_at in users.items():
        rec = jobs.get(jid)
        if rec is None:
            (busy if t - named_at < USER_GRACE_S else done).append(jid)
        elif rec.terminal:
            done.append(jid)
        else:
            busy.append(jid)
    return busy, done


def jobs_in_flight(ds: DatasetRecord, jobs) -> list[str]:
    """Ids of the queued or running jobs that read this dataset."""
    return _user_state(jobs, ds.users, now())[0]


def use_dataset(datasets: DatasetStore, jobs, dataset_id: str, owner: str, job_id: str,
                max_images: int, min_images: int) -> DatasetRecord:
    """Record that ``job_id`` (about to be inserted) reads the dataset; the dataset must be the
    owner's, ready, and within the job limits. Raises :class:`DatasetUnavailable`.

    Done before the job's insert and atomically with the state check, so a ``DELETE`` either
    sees this user or has already made the dataset unusable; never a job on deleted files.
    """
    ds = datasets.get(dataset_id)
    if ds is None or ds.owner != owner:
        raise DatasetUnavailable(404, f"no dataset with id {dataset_id!r}")
    # Users whose jobs are over are dropped here, so the map stays the size of what is in flight.
    _, finished = _user_state(jobs, ds.users, now())
    verdict: dict = {}

    def fn(rec: DatasetRecord) -> DatasetRecord | None:
        if rec.deleting:
            verdict["err"] = DatasetUnavailable(404, f"no dataset with id {dataset_id!r} (it is being deleted)")
        elif rec.state != DatasetState.ready:
            why = f": {rec.error}" if rec.state == DatasetState.invalid and rec.error else ""
            verdict["err"] = DatasetUnavailable(409, f"dataset {dataset_id} is {rec.state.value}{why}; "
                                                     f"a job can use it once it is ready")
        elif (rec.n_images or 0) > max_images:
            verdict["err"] = DatasetUnavailable(413, f"dataset {dataset_id} holds {rec.n_images} images, above "
                                                     f"the limit of {max_images} per job")
        elif (rec.n_images or 0) < min_images:
            verdict["err"] = DatasetUnavailable(422, f"dataset {dataset_id} holds {rec.n_images} image(s): "
                                                     f"a job needs at least {min_images}")
        if verdict:
            return None
        rec = rec.model_copy(deep=True)
        for jid in finished:
            rec.users.pop(jid, None)
        rec.users[job_id] = rec.last_used_at = now()
        return rec

    rec, changed = datasets.update(dataset_id, fn)
    if rec is None:
        raise DatasetUnavailable(404, f"no dataset with id {dataset_id!r}")
    if "err" in verdict:
        raise verdict["err"]
    return rec


def release_use(datasets: DatasetStore, dataset_id: str, job_id: str) -> None:
    """The job was not created after all: it no longer holds the dataset."""

    def fn(rec: DatasetRecord) -> DatasetRecord | None:
        if job_id not in rec.users:
            return None
        rec = rec.model_copy(deep=True)
        del rec.users[job_id]
        return rec

    datasets.update(dataset_id, fn)


def begin_delete(datasets: DatasetStore, jobs, dataset_id: str) -> tuple[DatasetRecord | None, list[str], str | None]:
    """Mark the dataset as being deleted unless a job in flight reads it or it is being validated.

    Returns the record, the ids of the jobs in flight that use it, and a reason it was not
    marked (``None`` when it was). The users are read from the job store, then the mark is set
    only if no user was added meanwhile: a job naming it concurrently is never left without files.
    """
    while True:
        ds = datasets.get(dataset_id)
        if ds is None:
            return None, [], "gone"
        busy, _ = _user_state(jobs, ds.users, now())
        if busy:
            return ds, busy, "in use"
        seen = set(ds.users)
        verdict: dict = {}

        def fn(rec: DatasetRecord) -> DatasetRecord | None:
            if set(rec.users) - seen:
                verdict["retry"] = True
                return None
            if rec.state == DatasetState.validating and (rec.check_until or 0) > now():
                verdict["why"] = "validating"
                return None
            if rec.deleting:
                return None
            return rec.model_copy(update={"deleting": True, "updated_at": now()})

        rec, _ = datasets.update(dataset_id, fn)
        if verdict.get("retry"):
            continue
        if rec is None:
            return None, [], "gone"
        return rec, [], verdict.get("why")


def purge_dataset(datasets: DatasetStore, artifacts: ArtifactStore, dataset_id: str) -> None:
    """Files first, then the record: a failure half-way leaves a marked record the sweep
    finishes, never files that no record points to."""
    shutil.rmtree(artifacts.dataset_dir(dataset_id), ignore_errors=True)
    datasets.delete(dataset_id)


def sweep_datasets(datasets: DatasetStore, jobs, artifacts: ArtifactStore, ttl_s: float | None) -> list[str]:
    """Finish interrupted deletes, and delete datasets unused for ``ttl_s`` that no job in
    flight reads (an abandoned upload too: its last chunk counts as a use). Safe to run twice."""
    gone = []
    t = now()
    for did in datasets.all_ids():
        ds = datasets.get(did)
        if ds is None:
            continue
        expired = ttl_s is not None and t - max(ds.last_used_at, ds.updated_at) > ttl_s
        if not (ds.deleting or expired):
            continue
        if not ds.deleting:
            ds, _busy, why = begin_delete(datasets, jobs, did)
            if ds is None or why is not None:
                continue
        purge_dataset(datasets, artifacts, did)
        gone.append(did)
    return gone
