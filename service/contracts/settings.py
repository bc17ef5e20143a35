"""Service settings, read from ``CONGEAL_*`` environment variables.

Shared by the API and the worker so that both agree on the Redis URL, the
artifact store and the limits. No FastAPI here: the worker imports it.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Every knob of the service. ``CONGEAL_REDIS_URL`` unset means embedded mode."""

    model_config = SettingsConfigDict(env_prefix="CONGEAL_", extra="ignore", frozen=True)

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
    checkpoint_every_s: float | None = Field(
        None, ge=0, description="DPRC checkpoint interval; unset: the method's default")

    # --- limits (a later issue adds per-tenant quotas on top of these)
    max_upload_bytes: int = Field(2 * 1024**3, ge=1)
    max_files_per_upload: int = Field(100_000, ge=1)
    max_images_per_job: int = Field(100_000, ge=1)
    max_pixels_per_image: int = Field(40_000_000, ge=1)
    max_side_per_image: int = Field(16_384, ge=1)
    max_budget: int = Field(1000, ge=1, description="largest training budget (epochs) a job may ask for")
    sync_inference_max_images: int = Field(64, ge=0, description="inference batches up to this size are "
                                                                 "answered synchronously")
    sync_inference_timeout_s: float = Field(60.0, gt=0, description="how long a synchronous inference "
                                                                    "waits before answering 202 with the job")
    page_size_max: int = Field(100, ge=1)

    @property
    def inference_queue_name(self) -> str:
        return self.inference_queue or f"{self.queue}.inference"

    @property
    def embedded(self) -> bool:
        return not self.redis_url
