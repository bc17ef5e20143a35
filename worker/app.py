"""The Celery worker: ``celery -A worker.app worker -Q congeal,congeal.inference``.

Tasks are thin (job id in, nothing out): they hand the id to the shared
supervisor, which claims the job, runs the training child and records the
outcome in the job store. This process never imports torch; only the child
does (``worker.run_job``), so fork, spawn and CUDA cannot get in each other's way
whatever pool runs the tasks. One worker per GPU: give each worker container
its own device (``congeal compose`` writes a service per GPU, each with its device_ids).
"""
from __future__ import annotations

import os

from celery import Celery, signals

from service.contracts import TASK_NAMES, ArtifactStore, CeleryDispatcher, JobKind, Settings, celery_config, open_store
from service.contracts.logs import configure_logging
from service.execution import JobRunner, Maintenance, worker_name

__all__ = ["app", "run_align", "run_apply", "run_pair"]

settings = Settings()
app = Celery("congeal")
app.conf.update(celery_config(settings))

_runtime: dict = {}


def _runner(hostname: str | None) -> JobRunner:
    """One store connection and runner per process, made lazily: prefork children
    must not share the parent's Redis sockets."""
    if _runtime.get("pid") != os.getpid():
        _runtime.clear()
        store = open_store(settings)
        _runtime.update(pid=os.getpid(), runner=JobRunner(store, ArtifactStore(settings.data_dir), settings,
                                                          name=worker_name(hostname)))
    return _runtime["runner"]


def _run(task, job_id: str) -> str:
    return _runner(task.request.hostname).run(job_id)  # logs the outcome, with the job's id


@app.task(name=TASK_NAMES[JobKind.align], bind=True)
def run_align(self, job_id: str) -> str:
    return _run(self, job_id)


@app.task(name=TASK_NAMES[JobKind.apply], bind=True)
def run_apply(self, job_id: str) -> str:
    return _run(self, job_id)


@signals.setup_logging.connect
def _logging(loglevel=None, **_):
    """Structured lines (CONGEAL_LOG_FORMAT) for Celery's own loggers and ours, at the worker's
    --loglevel: connecting here keeps Celery from installing its own handlers."""
    configure_logging(loglevel or settings.log_level, settings.log_format)


@app.task(name=TASK_NAMES[JobKind.pair], bind=True)
def run_pair(self, job_id: str) -> str:
    return _run(self, job_id)


_maintenance: dict = {}


@signals.worker_ready.connect
def _start_maintenance(sender=None, **_):
    """Heartbeat (read by /readyz) and the reconciler, in the main worker process."""
    hostname = getattr(sender, "hostname", None)
    m = Maintenance(open_store(settings), CeleryDispatcher(settings, app=app), settings,
                    name=hostname or worker_name(), info={"kind": "celery", "queues": _queues(sender)})
    _maintenance["m"] = m.start()


@signals.worker_process_shutdown.connect
def _close_runner(**_):
    """A pool process ending ends its spare training child (which would also die with it)."""
    runner = _runtime.get("runner") if _runtime.get("pid") == os.getpid() else None
    if runner is not None:
        runner.close()


@signals.worker_shutdown.connect
def _stop_maintenance(**_):
    m = _maintenance.pop("m", None)
    if m is not None:
        m.stop()


def _queues(consumer) -> list[str]:
    try:
        return sorted(q.name for q in consumer.app.amqp.queues.consume_from.values())
    except Exception:
        return []
