"""What the API and the workers exchange: settings, job and dataset records, the stores they
live in, the artifact store's layout, task names and payloads.

Running jobs is :mod:`service.execution`'s. The dependency arrows point one way: ``service`` ->
``service.execution`` -> ``service.contracts`` <- ``worker`` -> ``models``. Nothing here imports
FastAPI or torch (a test checks).
"""
from pathlib import Path

from .artifacts import RESULT_IMAGES, ArtifactStore, new_dataset_id, new_job_id, valid_dataset_id, valid_job_id
from .datasets import DatasetFile, DatasetRecord, DatasetState, DatasetStore
from .records import (METHOD_MAX_IMAGES, METHODS, PAIR_METHODS, TERMINAL, WARPS, Attempt, JobKind, JobOptions, JobRecord, JobStatus,
                      ProgressRecord)
from .redis_store import RedisDatasetStore, RedisJobStore
from .settings import Settings
from .sqlite_store import SqliteDatasetStore, SqliteJobStore
from .store import Claim, JobStore
from .tasks import TASK_NAMES, CeleryDispatcher, Dispatcher, celery_config, queue_for

__all__ = [
    "ArtifactStore", "new_job_id", "valid_job_id", "new_dataset_id", "valid_dataset_id", "RESULT_IMAGES",
    "DatasetFile", "DatasetRecord", "DatasetState", "DatasetStore", "RedisDatasetStore", "SqliteDatasetStore",
    "open_dataset_store",
    "METHODS", "METHOD_MAX_IMAGES", "PAIR_METHODS", "WARPS", "TERMINAL", "Attempt", "JobKind", "JobOptions", "JobRecord", "JobStatus", "ProgressRecord",
    "Settings",
    "Claim", "JobStore", "RedisJobStore", "SqliteJobStore", "open_store",
    "TASK_NAMES", "CeleryDispatcher", "Dispatcher", "celery_config", "queue_for",
]


def open_store(settings: Settings) -> JobStore:
    """The job store the settings ask for: Redis if a URL is set, else SQLite in the data dir."""
    if settings.redis_url:
        return RedisJobStore(settings.redis_url, settings.key_prefix)
    return SqliteJobStore(Path(settings.data_dir) / "jobs.sqlite3")


def open_dataset_store(settings: Settings) -> DatasetStore:
    """Beside the jobs: the same Redis and key prefix, or the same SQLite file."""
    if settings.redis_url:
        return RedisDatasetStore(settings.redis_url, settings.key_prefix)
    return SqliteDatasetStore(Path(settings.data_dir) / "jobs.sqlite3")
