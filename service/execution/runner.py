"""Running one job: the supervisor both deployments share.

The supervisor is deliberately torch-free. It claims the job in the store,
starts the training child (``python -m worker.run_job``) in its own process
group, relays the child's progress into the record, and enforces cancel and
the time limit by killing that group. Running training in a child rather than
in the Celery process gives, for free: a clean CUDA context per job, GPU
memory returned when the child exits, hard cancellation, and a crash that
takes down only the child. The Celery task (``worker.app``) and the embedded
runner (``service.embedded``) both call :meth:`JobRunner.run`; what keeps jobs
moving when a worker dies is :mod:`.maintenance`.

Child protocol: one JSON object per line on the file descriptor passed as
``--progress-fd``::

    {"type": "progress", "stage": ..., "step": ..., "total": ..., "epoch": ..., "loss": ...,
     "apsnr": ..., "eta_s": ..., "message": ...}
    {"type": "result", "summary": {...}}
    {"type": "error", "kind": "input" | "cancelled" | "internal", "message": "..."}

and an exit status from ``EXIT_*``.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..contracts.artifacts import ArtifactStore
from ..contracts.records import JobKind, JobRecord, JobStatus, ProgressRecord
from ..contracts.settings import Settings
from ..contracts.logs import bind, log_context
from ..contracts.store import JobStore
from ..contracts.usage import UsageStore, attempt_usage, open_usage_store
from .progress import RESUME_PREFIX, ProgressRelay

__all__ = [
    "CHILD_MODULE",
    "EXIT_OK",
    "EXIT_INTERNAL",
    "EXIT_INPUT",
    "EXIT_CANCELLED",
    "JobRunner",
    "read_summary",
    "worker_name",
    "RESUME_PREFIX",
]

log = logging.getLogger("congeal.runner")

CHILD_MODULE = "worker.run_job"
EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_CANCELLED = 0, 1, 2, 3


def worker_name(prefix: str | None = None) -> str:
    return f"{prefix or socket.gethostname()}/{os.getpid()}"


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class _Spare:
    """A training child started ahead of its job (``--standby``): its imports done, it waits for
    one line on ``control`` naming the job; ``progress`` is the read end of its progress pipe."""

    def __init__(self, proc: subprocess.Popen, progress: int, control: int):
        self.proc, self.progress, self.control = proc, progress, control

    def discard(self) -> None:
        _kill_group(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for fd in (self.progress, self.control):
            try:
                os.close(fd)
            except OSError:
                pass


class JobRunner:
    """Runs jobs by id. One instance per worker thread or process.

    With ``settings.warm_child`` it keeps one training child started ahead (a :class:`_Spare`,
    made as the previous job ends), so a job does not wait for the child's imports; a spare
    that has died is replaced by a fresh child. :meth:`close` ends the spare."""

    def __init__(self, store: JobStore, artifacts: ArtifactStore, settings: Settings,
                 name: str | None = None, python: str = sys.executable, poll_s: float = 0.5):
        self.store, self.artifacts, self.settings = store, artifacts, settings
        self.name = name or worker_name()
        self.python = python
        self.poll_s = poll_s
        self.usage: UsageStore | None = None  # opened on the first attempt that ends
        self._spare: _Spare | None = None

    def close(self) -> None:
        """End the spare training child, if any (a job running now is not touched)."""
        sp, self._spare = self._spare, None
        if sp is not None:
            sp.discard()

    def _child_cmd(self, *args: str) -> list[str]:
        return [self.python, "-m", CHILD_MODULE, *args, "--parent-pid", str(os.getpid())]

    def _start_spare(self) -> None:
        if not self.settings.warm_child or (self._spare is not None and self._spare.proc.poll() is None):
            return
        self.close()
        r, w = os.pipe()
        cr, cw = os.pipe()
        try:
            proc = subprocess.Popen(
                self._child_cmd("--standby", "--control-fd", str(cr), "--progress-fd", str(w)),
                pass_fds=(w, cr), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        except OSError as e:
            for fd in (r, w, cr, cw):
                os.close(fd)
            log.warning("could not start a spare training process: %s", e)
            return
        os.close(w)
        os.close(cr)
        self._spare = _Spare(proc, r, cw)

    def _take_spare(self, spec_path: Path, log_path: Path) -> tuple[subprocess.Popen, int] | None:
        """Give the job to the spare: its process and progress pipe, or None (no live spare)."""
        sp, self._spare = self._spare, None
        if sp is None:
            return None
        if sp.proc.poll() is not None:
            sp.discard()
            return None
        try:
            os.write(sp.control, (json.dumps({"spec": str(spec_path), "log": str(log_path)}) + "\n").encode())
        except OSError:
            sp.discard()
            return None
        os.close(sp.control)
        return sp.proc, sp.progress

    # ------------------------------------------------------------------ spec

    def _spec(self, rec: JobRecord, attempt: int) -> dict:
        s, a = self.settings, self.artifacts
        method_options = {}
        if rec.kind == JobKind.align:
            method_options = rec.options.method_options()
            if rec.options.method == "dprc" and s.checkpoint_every_s is not None:
                method_options["checkpoint_every_s"] = s.checkpoint_every_s
            if method_options.get("features") == "vit" and s.vit_weights is not None:
                # (a worker without the file fails the job with DenseConfig's own reason)
                method_options["vit_path"] = str(s.vit_weights)
        return {
            "job_id": rec.id,
            "kind": rec.kind.value,
            "attempt": attempt,
            "options": rec.options.model_dump(),
            "method_options": method_options,
            "device": s.device,
            "input_path": str(a.job_input(rec.id, rec.input_archive, rec.dataset_id)),
            "output_dir": str(a.output_dir(rec.id)),
            "checkpoint_dir": str(a.checkpoint_dir(rec.id)),
            "model_dir": str(a.model_dir(rec.model_id)) if rec.model_id else None,
            "aligned_zip": str(a.aligned_zip(rec.id)),
            "pair_request": str(a.pair_request(rec.id)) if rec.kind == JobKind.pair else None,
            "limits": {"max_images": s.max_images_per_job, "max_pixels": s.max_pixels_per_image,
                       "max_side": s.max_side_per_image},
        }

    # ------------------------------------------------------------------ run

    def run(self, job_id: str, stop: threading.Event | None = None) -> str:
        """Run one delivery of ``job_id`` to its end. Returns what happened, in words.

        Raises only if the store is unreachable at claim time; everything that
        goes wrong in the job itself is recorded in the job. Every line logged meanwhile
        names the job (and the request that created it); the attempt's outcome and device
        time are added to the usage totals.
        """
        with log_context(job_id=job_id):
            outcome = self._run(job_id, stop)
            if not outcome.startswith("skipped"):
                self._account(job_id)
                # After the job, not beside it: on a 2-core machine the imports running beside a
                # job's training slowed a small job down more than they saved the next one.
                self._start_spare()
            log.info("job %s: %s", job_id, outcome)
            return outcome

    def _account(self, job_id: str) -> None:
        try:
            rec = self.store.get(job_id)
            amounts = attempt_usage(rec, self.name, self.settings.device) if rec is not None else {}
            if amounts:
                if self.usage is None:
                    self.usage = open_usage_store(self.settings)
                self.usage.add(amounts)
        except Exception:  # the totals are for watching, never a reason to fail a job
            log.exception("job %s: could not add the attempt to the usage totals", job_id)

    def _run(self, job_id: str, stop: threading.Event | None) -> str:
        s = self.settings
        claim = self.store.claim(job_id, self.name, s.lease_ttl_s, s.max_attempts)
        if not claim.run:
            log.info("job %s: not running it (%s)", job_id, claim.reason)
            return f"skipped: {claim.reason}"
        rec = claim.record
        bind(request_id=rec.request_id)
        attempt = rec.attempts[-1].n
        a = self.artifacts
        ckpt = a.checkpoint_dir(job_id)
        had_ckpt = ckpt.is_dir() and any(ckpt.iterdir())
        spec_path = a.run_spec(job_id)
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = spec_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._spec(rec, attempt), indent=1))
        os.replace(tmp, spec_path)

        limit = min(rec.options.time_limit_s or s.job_time_limit_s, s.job_time_limit_s)
        with open(a.log_path(job_id), "ab") as logf:
            logf.write(f"\n=== attempt {attempt} on {self.name} at {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
            logf.flush()
            launched = self._take_spare(spec_path, a.log_path(job_id))
            if launched is not None:
                proc, r = launched
            else:
                r, w = os.pipe()
                try:
                    proc = subprocess.Popen(
                        self._child_cmd(str(spec_path), "--progress-fd", str(w)),
                        pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                        start_new_session=True,  # its own process group: cancel kills the whole group
                        env={**os.environ, "PYTHONUNBUFFERED": "1"},
                    )
                except OSError as e:
                    os.close(r)
                    os.close(w)
                    self.store.finish(job_id, self.name, JobStatus.failed, error_kind="internal",
                                      error=f"could not start the training process: {e}")
                    return "failed: could not start the child"
                os.close(w)
        relay = ProgressRelay(r, self.store, job_id, self.name)
        relay.start()
        try:
            self.store.report(job_id, self.name, None, pid=proc.pid, checkpoint_at_start=had_ckpt)
            log.info("job %s: attempt %d, child pid %d, time limit %ss", job_id, attempt, proc.pid, limit)
            rc, killed_for = self._supervise(proc, job_id, limit, stop)
        finally:
            # Whatever happened here, nothing of this attempt may keep running: if we are
            # raising, the lease lapses and the next attempt resumes from the checkpoint.
            _kill_group(proc.pid, signal.SIGKILL)
            proc.wait()
        relay.join()
        return self._conclude(job_id, attempt, rc, relay, killed_for, limit)

    def _supervise(self, proc: subprocess.Popen, job_id: str, limit: int,
                   stop: threading.Event | None) -> tuple[int, str | None]:
        """Wait for the child, renewing the lease and enforcing cancel, time limit and shutdown.

        Returns the exit status and why we killed the child, if we did.
        """
        s = self.settings
        started = time.monotonic()
        next_renew = 0.0
        cancelling_since: float | None = None
        killed_for: str | None = None
        while True:
            try:
                return proc.wait(timeout=self.poll_s), killed_for
            except subprocess.TimeoutExpired:
                pass
            t = time.monotonic()
            try:
                if t >= next_renew:
                    cur = self.store.renew_lease(job_id, self.name, s.lease_ttl_s)
                    next_renew = t + s.lease_ttl_s / 3
                    if cur is None and killed_for is None:
                        # Our lease lapsed and the job moved on (another worker resumed it,
                        # or it was finished): stop so two runs never share a checkpoint.
                        killed_for = "lease"
                        _kill_group(proc.pid, signal.SIGKILL)
                else:
                    cur = self.store.get(job_id)
            except Exception:
                log.exception("job %s: job store unreachable; training continues", job_id)
                cur = None
            if cur is not None and cur.cancel_requested and cancelling_since is None:
                cancelling_since = t
                _kill_group(proc.pid, signal.SIGTERM)  # the child stops at its next step
            if cancelling_since is not None and t - cancelling_since > s.cancel_grace_s:
                _kill_group(proc.pid, signal.SIGKILL)
            if killed_for is None and t - started > limit:
                killed_for = "time"
                _kill_group(proc.pid, signal.SIGKILL)
            if killed_for is None and stop is not None and stop.is_set():
                killed_for = "shutdown"
                _kill_group(proc.pid, signal.SIGKILL)

    def _conclude(self, job_id: str, attempt: int, rc: int, relay: ProgressRelay, killed_for: str | None,
                  limit: int) -> str:
        st = self.store
        if killed_for == "lease":
            return "abandoned: lease lost"
        if killed_for == "shutdown":
            st.release(job_id, self.name)
            return "interrupted: will resume"
        cur = st.get(job_id)
        cancel = cur is not None and cur.cancel_requested
        err = relay.error or {}
        if rc == EXIT_OK and relay.summary is not None:
            w = relay.last_work
            done = ProgressRecord(stage="done", step=w.total if w else 0, total=w.total if w else 0,
                                  epoch=w.epoch if w else 0, loss=w.loss if w else None,
                                  apsnr=relay.summary.get("apsnr_after"))
            # The checkpoint goes only if this attempt's result was recorded: a worker whose lease
            # lapsed meanwhile must not delete the checkpoint of the attempt that replaced it.
            if not st.finish(job_id, self.name, JobStatus.succeeded, result=relay.summary, progress=done):
                return "abandoned: lease lost before the result was recorded"
            self.artifacts.discard_checkpoint(job_id)
            return "succeeded"
        if cancel or err.get("kind") == "cancelled":
            if not st.finish(job_id, self.name, JobStatus.cancelled,
                             progress=ProgressRecord(stage="cancelled", message="cancelled on request")):
                return "abandoned: lease lost before the cancel was recorded"
            self.artifacts.discard_checkpoint(job_id)
            return "cancelled"
        if rc < 0 and not err and killed_for is None:
            # Killed by a signal nobody here sent (the kernel's OOM killer, an operator, a crash):
            # treated like a dead worker, so the job resumes from its checkpoint, and the attempt
            # counts against max_attempts, so a job that is killed every time still ends.
            detail = f"the job process was killed by {_signal_name(-rc)}"
            if -rc == signal.SIGKILL:
                detail += " (out of memory?)"
            if not st.abandon(job_id, self.name, detail):
                return "abandoned: lease lost"
            log.warning("job %s: %s; the reconciler will requeue it", job_id, detail)
            return f"lost: {detail}; will resume"
        kind = "internal"
        if killed_for == "time":
            kind, msg = "time_limit", f"stopped after exceeding its time limit of {limit} s (attempt {attempt})"
        elif err.get("kind") == "input":
            kind, msg = "input", err.get("message") or "the input could not be used"
        elif err.get("message"):
            what = {JobKind.apply: "inference", JobKind.pair: "pair alignment"}.get(cur.kind if cur else None,
                                                                                   "training")
            msg = f"{what} failed: {err['message']}"
        elif rc < 0:
            msg = f"the job process was killed by {_signal_name(-rc)}"
        else:
            msg = f"the job process exited with status {rc}: {self._log_tail(job_id)}"
        st.finish(job_id, self.name, JobStatus.failed, error=msg, error_kind=kind)
        return f"failed: {msg}"

    def _log_tail(self, job_id: str) -> str:
        try:
            lines = [x for x in self.artifacts.log_path(job_id).read_text(errors="replace").splitlines() if x.strip()]
            return lines[-1][-500:] if lines else "no output"
        except OSError:
            return "no log"


def _signal_name(sig: int) -> str:
    return signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)


def read_summary(output_dir: Path) -> dict:
    """The small result kept in the job record, from the output folder's metrics.json."""
    m = json.loads((output_dir / "metrics.json").read_text())
    keep = ("n_images", "apsnr_before", "apsnr_after", "residual_summary", "framing_summary",
            "consistency_summary", "warnings",
            "seconds", "output_size", "method", "warp", "reference", "notes", "device")
    out = {k: m.get(k) for k in keep if k in m}
    out["has_model"] = (output_dir / "model" / "pipeline.json").is_file()
    out["has_report"] = (output_dir / "report.html").is_file()
    return out
