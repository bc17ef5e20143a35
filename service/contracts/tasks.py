"""Task names, queues and the Celery settings both sides share.

The API sends tasks *by name* (it never imports the worker's task
functions), so the names are the contract; ``tests/service`` checks that the
worker app registers every one of them. A task's only argument is the job id:
everything else is in the job record and the artifact store.
"""
from __future__ import annotations

from typing import Protocol

from .records import JobKind, JobRecord
from .settings import Settings

__all__ = ["TASK_NAMES", "queue_for", "celery_config", "Dispatcher", "CeleryDispatcher"]

TASK_NAMES: dict[JobKind, str] = {
    JobKind.align: "congeal.align",
    JobKind.apply: "congeal.apply",
    JobKind.pair: "congeal.pair",
}


def queue_for(kind: JobKind, settings: Settings) -> str:
    """Inference has its own queue so that a dedicated worker pool can keep its latency low; pair
    jobs train a network per pair, so they queue with training."""
    return settings.inference_queue_name if kind == JobKind.apply else settings.queue


def celery_config(settings: Settings) -> dict:
    """Configuration for both the worker app and the API's sending-only app."""
    return dict(
        broker_url=settings.redis_url,
        # The record in the job store is the state; Celery results would only expire or lie.
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=settings.queue,
        # Long GPU tasks: take one message at a time and acknowledge it only when the
        # job is over, so a worker that dies leaves the message to be redelivered.
        task_acks_late=True,
        task_reject_on_worker_lost=True,  # loops are bounded by the record's attempt counter
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # Task events (received, started, succeeded, ...) for Flower and other monitors; the
        # task's only argument is the job id, so they name the job.
        worker_send_task_events=True,
        task_send_sent_event=True,
    )


class Dispatcher(Protocol):
    """Hands a job to whatever runs jobs (Celery workers, or the embedded runner)."""

    def dispatch(self, rec: JobRecord) -> None: ...

    def close(self) -> None: ...


class CeleryDispatcher:
    """Sends a job's task by name through the Redis broker."""

    def __init__(self, settings: Settings, app=None):
        if app is None:
            from celery import Celery

            app = Celery("congeal-client", set_as_current=False)
            app.conf.update(celery_config(settings))
        self.app = app
        self.settings = settings

    def dispatch(self, rec: JobRecord) -> None:
        self.app.send_task(TASK_NAMES[rec.kind], args=[rec.id], queue=queue_for(rec.kind, self.settings),
                           retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2,
                                                     "interval_step": 0.5, "interval_max": 1})

    def close(self) -> None:
        self.app.close()
