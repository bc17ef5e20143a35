"""Service settings, read from ``CONGEAL_*`` environment variables.

Shared by the API and the worker so that both agree on the Redis URL, the
artifact store and the limits. No FastAPI here: the worker imports it.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "hash_api_key"]

# Pillow's format name (lower case) -> the file name endings that announce it.
IMAGE_FORMAT_EXTENSIONS = {"png": (".png",), "jpeg": (".jpg", ".jpeg"), "tiff": (".tif", ".tiff"), "bmp": (".bmp",)}
_KEY_ENTRY = re.compile(r"^([A-Za-z0-9_.-]{1,64}):([0-9a-f]{64})$")


def hash_api_key(key: str) -> str:
    """What ``CONGEAL_API_KEYS`` stores for a key: its SHA-256, hex. Keys are long random
    tokens, so a fast unsalted hash is enough; only the hash ever sits in the config."""
    return hashlib.sha256(key.encode()).hexdigest()


class Settings(BaseSettings):
    """Every knob of the service. ``CONGEAL_REDIS_URL`` unset means embedded mode."""

    # hide_input_in_errors: a bad setting must not print a secret an operator pasted by mistake.
    model_config = SettingsConfigDict(env_prefix="CONGEAL_", extra="ignore", frozen=True, hide_input_in_errors=True)

    # --- deployment
    redis_url: str | None = Field(
        None, description="Redis for job records and the Celery broker; unset: embedded mode "
                          "(in-process worker, SQLite job store)")
    data_dir: Path = Field(Path("congeal-data"), description="artifact store shared by API and workers")
    key_prefix: str = Field("congeal", description="prefix of every Redis key the service writes")
    queue: str = Field("congeal", description="Celery queue for training jobs")
    inference_queue: str | None = Field(None, description="queue for inference jobs; default: '<queue>.inference'")
    device: str = Field("auto", description="torch device the training child uses (auto, cpu, cuda, cuda:1)")
    embedded_workers: int = Field(1, ge=1, le=16, description="job threads in embedded mode")
    log_format: Literal["logfmt", "json"] = Field(
        "logfmt", description="log lines of the API and the workers: key=value pairs, or one JSON object each")
    log_level: str = Field("INFO", pattern=r"^(?i:debug|info|warning|error|critical)$",
                           description="the API's log level (a worker's is its --loglevel)")

    # --- tenants
    api_keys: str | None = Field(
        None, description="comma-separated 'tenant:sha256hex' entries (hash: service.contracts.hash_api_key, "
                          "or `printf %s KEY | sha256sum`); unset: the API refuses to start, unless allow_open")
    allow_open: bool = Field(False, description="without api_keys: serve everyone as 'anonymous' "
                                                "(otherwise the API refuses to start)")
    max_jobs_in_flight_per_key: int = Field(8, ge=1, description="queued + running jobs one tenant may have")
    rate_limit_per_minute: int = Field(1200, ge=0, description="requests per tenant per minute "
                                                               "(sliding 60 s window, kept in Redis); 0: off")
    job_ttl_s: float | None = Field(
        7 * 24 * 3600, gt=0, description="finished jobs (record and files) are deleted this long after they "
                                         "end; unset: kept forever")
    sweep_interval_s: float = Field(60.0, gt=0, description="how often workers look for expired jobs")

    # --- reliability
    visibility_timeout_s: int = Field(
        24 * 3600, ge=1,
        description="Redis broker: an unacknowledged task is redelivered after this long. Keep it above "
                    "job_time_limit_s; a dead worker's job is recovered sooner through its lease")
    job_time_limit_s: int = Field(6 * 3600, ge=1, description="hard limit on one attempt of one job")
    lease_ttl_s: float = Field(30.0, gt=0, description="a running job whose worker has not renewed its "
                                                       "lease for this long is requeued")
    reconcile_interval_s: float = Field(5.0, gt=0, description="how often a worker looks for orphaned jobs")
    max_attempts: int = Field(3, ge=1, description="how many times a job's worker may die (orderly "
                                                   "shutdowns not counted) before the job fails")
    cancel_grace_s: float = Field(5.0, ge=0, description="SIGTERM to SIGKILL delay when cancelling")
    warm_child: bool = Field(True, description="keep one training child started ahead, its imports done, "
                                               "so the next job does not wait for them")
    checkpoint_every_s: float | None = Field(
        None, ge=0, description="DPRC checkpoint interval; unset: the method's default")
    requeue_queued_after_s: float = Field(
        300.0, gt=0, description="a queued job whose task was sent this long ago and has not started is sent "
                                 "again (a lost broker message); the wait doubles with each re-send")

    # --- upload checks in the API process (memory stays bounded whatever is uploaded)
    upload_check_memory_bytes: int = Field(
        256 * 1024**2, ge=1024**2, description="decoded pixels all upload checks of one API process may hold "
                                               "at once; an image larger than this is checked alone")
    max_upload_checks_per_key: int = Field(2, ge=1, description="uploads of one API key checked at once by one "
                                                                "API process; the others wait")

    # --- limits (a later issue adds per-tenant quotas on top of these)
    max_upload_bytes: int = Field(2 * 1024**3, ge=1)
    max_files_per_upload: int = Field(100_000, ge=1)
    # 10,000,000 28x28 images fit (issue 14); what arrives by multipart is still capped by
    # max_upload_bytes, so the big jobs come from datasets.
    max_images_per_job: int = Field(10_000_000, ge=1)
    max_pixels_per_image: int = Field(40_000_000, ge=1)
    max_side_per_image: int = Field(16_384, ge=1)
    max_archive_members: int = Field(250_000, ge=1, description="entries in one uploaded archive")
    max_uncompressed_bytes: int = Field(4 * 1024**3, ge=1, description="an archive's total expanded size")
    max_compression_ratio: float = Field(200.0, gt=1, description="expanded/compressed size of an archive member "
                                                                  "above 1 MiB (zip bombs)")
    allowed_formats: str = Field("png,jpeg,tiff,bmp", description="image formats accepted, comma-separated, "
                                                                 "among png, jpeg, tiff, bmp (checked by content)")
    max_budget: int = Field(1000, ge=1, description="largest training budget (epochs) a job may ask for")
    vit_weights: Path | None = Field(
        None, description="a ViT's weights (safetensors, DINO-style ViT-S/B) for dense jobs that ask for "
                          "features 'vit'; read from disk, never downloaded; unset: such jobs are refused")
    max_gpus_per_job: int = Field(1, ge=1, description="GPUs one job may train on (a worker's GPUs; one job "
                                                       "over several runs torchrun inside the worker's child)")
    sync_inference_max_images: int = Field(64, ge=0, description="inference batches up to this size are "
                                                                 "answered synchronously")
    sync_inference_timeout_s: float = Field(60.0, gt=0, description="how long a synchronous inference "
                                                                    "waits before answering 202 with the job")
    max_pairs_per_job: int = Field(1000, ge=1, description="image pairs one POST /pairs may ask for")
    page_size_max: int = Field(100, ge=1)
    per_image_page_size_max: int = Field(
        10_000, ge=1, description="largest 'limit' of GET /jobs/{id}/per-image (a row is ~0.3 kB of JSON: "
                                  "a 10,000,000-image job pages in 1,000 requests)")

    # --- datasets (uploaded once, in resumable chunks, named by several jobs)
    max_dataset_bytes: int = Field(16 * 1024**3, ge=1, description="bytes in one dataset, all files together "
                                   "(10,000,000 28x28 images as uint8 .npy shards are 7.9 GB)")
    max_dataset_files: int = Field(10_000, ge=1, description="files in one dataset")
    max_datasets_per_key: int = Field(20, ge=1, description="datasets one tenant may hold at once (disk)")
    dataset_ttl_s: float | None = Field(
        None, gt=0, description="a dataset no job in flight uses is deleted this long after it was last "
                                "used (created, uploaded to, named by a job); unset: job_ttl_s")
    dataset_check_timeout_s: float = Field(3600.0, gt=0, description="longest validation of one dataset")
    dataset_check_memory_bytes: int = Field(
        4 * 1024**3, ge=128 * 1024**2, description="memory (RLIMIT_DATA) of the process that validates a "
                                                  "dataset; mapped files do not count")
    max_dataset_checks: int = Field(2, ge=1, description="datasets validated at once per API process")

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        for entry in v.split(","):
            if not _KEY_ENTRY.match(entry.strip()):
                # Never echo the entry: an operator may have pasted a raw key here by mistake.
                raise ValueError("api_keys: each entry must be 'tenant:<64 lowercase hex sha256>' "
                                 "(tenant: letters, digits, '_', '.', '-')")
        return v

    @field_validator("allowed_formats")
    @classmethod
    def _check_formats(cls, v: str) -> str:
        got = {f.strip().lower() for f in v.split(",") if f.strip()}
        if not got or not got <= set(IMAGE_FORMAT_EXTENSIONS):
            raise ValueError(f"allowed_formats: a comma-separated subset of {', '.join(IMAGE_FORMAT_EXTENSIONS)}")
        return ",".join(sorted(got))

    @property
    def image_formats(self) -> frozenset[str]:
        return frozenset(self.allowed_formats.split(","))

    @property
    def image_extensions(self) -> tuple[str, ...]:
        return tuple(e for f in sorted(self.image_formats) for e in IMAGE_FORMAT_EXTENSIONS[f])

    @property
    def api_key_hashes(self) -> list[tuple[str, str]]:
        """``(tenant, sha256 hex)`` pairs; empty when access is open."""
        if not self.api_keys:
            return []
        return [tuple(e.strip().split(":", 1)) for e in self.api_keys.split(",")]  # type: ignore[misc]

    @property
    def inference_queue_name(self) -> str:
        return self.inference_queue or f"{self.queue}.inference"

    @property
    def embedded(self) -> bool:
        return not self.redis_url

    @property
    def dataset_ttl(self) -> float | None:
        return self.dataset_ttl_s if self.dataset_ttl_s is not None else self.job_ttl_s
