"""Job execution, shared by the Celery worker (``worker.app``) and embedded mode (``service.embedded``).

* :mod:`.runner`: :class:`JobRunner` claims a job, runs its training child
  (``python -m worker.run_job``) in its own process group under a lease, enforces cancel and the
  time limit, and records the outcome; the child's protocol and exit statuses.
* :mod:`.progress`: :class:`ProgressRelay`, the child's progress into the job record, rate-limited.
* :mod:`.maintenance`: :func:`reconcile` (requeue jobs whose worker died, re-send lost messages),
  retention (:func:`sweep_expired`, :func:`purge`), and :class:`Maintenance`, the background thread
  that runs them and the heartbeat.

Built on ``service.contracts`` (records, stores, artifacts, settings, task names: what the API and
the workers exchange). Imports neither FastAPI nor torch (a test checks): the arrows are
``service (API) -> service.execution -> service.contracts <- worker``, and only the training
child imports ``models``.
"""
from .maintenance import Maintenance, purge, reconcile, sweep_expired
from .progress import ProgressRelay
from .runner import EXIT_CANCELLED, EXIT_INPUT, EXIT_INTERNAL, EXIT_OK, JobRunner, read_summary, worker_name

__all__ = [
    "JobRunner", "read_summary", "worker_name", "EXIT_OK", "EXIT_INTERNAL", "EXIT_INPUT", "EXIT_CANCELLED",
    "ProgressRelay",
    "Maintenance", "reconcile", "purge", "sweep_expired",
]
