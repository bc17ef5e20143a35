"""What the API and the worker share: settings, job records, the job store, the
artifact store, task names, and the torch-free job supervisor.

The dependency arrows point one way: ``service`` -> ``service.contracts`` <-
``worker`` -> ``models``. Nothing here imports FastAPI or torch (a test checks).
"""
from .artifacts import RESULT_IMAGES, ArtifactStore, new_dataset_id, new_job_id, valid_dataset_id, valid_job_id
from .datasets import DatasetFile, DatasetRecord, DatasetState, DatasetStore, open_dataset_store
from .records import METHODS, PAIR_METHODS, TERMINAL, WARPS, Attempt, JobKind, JobOptions, JobRecord, JobStatus, ProgressRecord
from .settings import Settings
from .store import Claim, JobStore, RedisJobStore, SqliteJobStore, open_store
from .tasks import TASK_NAMES, CeleryDispatcher, Dispatcher, celery_config, queue_for

__all__ = [
    "ArtifactStore", "new_job_id", "valid_job_id", "new_dataset_id", "valid_dataset_id", "RESULT_IMAGES",
    "DatasetFile", "DatasetRecord", "DatasetState", "DatasetStore", "open_dataset_store",
    "METHODS", "PAIR_METHODS", "WARPS", "TERMINAL", "Attempt", "JobKind", "JobOptions", "JobRecord", "JobStatus", "ProgressRecord",
    "Settings",
    "Claim", "JobStore", "RedisJobStore", "SqliteJobStore", "open_store",
    "TASK_NAMES", "CeleryDispatcher", "Dispatcher", "celery_config", "queue_for",
]
