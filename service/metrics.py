"""What an operator watches: ``GET /metrics`` for Prometheus, and a structured log line per request.

:class:`RequestMiddleware` gives every request an id (the client's ``X-Request-ID`` when it is a
plain token, else a new one, echoed in the response), logs one line when it ends (method, route,
status, duration, the job it concerned) and times it for the latency histogram. The id is in the
context of every line logged while the request runs, and is stored with a job it creates, so the
worker's lines for that job carry it too.

``/metrics`` (``prometheus-client``'s text format, no API key; aggregates only, no tenants):

- ``congeal_http_request_duration_seconds{method, route, status}``: request latency, this API
  process (under ``uvicorn --workers N`` each process counts its own);
- ``congeal_jobs{state}``: jobs queued and running now;
- ``congeal_queue_depth{queue}``: tasks waiting in the broker (embedded: in this process's queue);
- ``congeal_workers``: workers whose heartbeat is current;
- ``congeal_job_attempts_total{kind, outcome}`` and ``congeal_device_seconds_total{kind, device}``:
  attempts the workers ran, and their wall time times the devices each held (GPU-seconds on
  ``device="cuda"``), from the shared usage totals (:mod:`service.contracts.usage`);
- ``congeal_store_up``: whether the job store answered this scrape.
"""
from __future__ import annotations

import logging
import re
import time
import uuid

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from congeal import __version__

from .contracts import JobKind, JobStatus, queue_for
from .contracts.logs import bind, log_context
from .contracts.usage import open_usage_store

__all__ = ["ServiceMetrics", "RequestMiddleware", "REQUEST_ID_HEADER", "CONTENT_TYPE_LATEST"]

log = logging.getLogger("congeal.api")

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# Seconds: from a health check to a large upload.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# kombu's Redis transport keeps messages of priority p > 0 in '<queue>\x06\x16<p>'.
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


class ServiceMetrics:
    """One app's metrics: its own registry (several apps can live in one process, as in tests)."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=False)
        self.latency = Histogram("congeal_http_request_duration_seconds", "HTTP request latency, by route template",
                                 ["method", "route", "status"], buckets=_BUCKETS, registry=self.registry)
        Gauge("congeal_build_info", "the running version", ["version"], registry=self.registry).labels(__version__).set(1)
        self._state = None
        self._usage = None
        self._redis = None

    def attach(self, state) -> None:
        """Start exporting what the job store knows (called once the app's state is built)."""
        self._state = state
        self._usage = open_usage_store(state.settings)
        if not state.settings.embedded:
            import redis

            self._redis = redis.Redis.from_url(state.settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
        self.registry.register(_StoreCollector(self))

    def close(self) -> None:
        for c in (self._usage, self._redis):
            if c is not None:
                c.close()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StoreCollector:
    """Read at each scrape: cheap reads (the active set, queue lengths, a hash of totals)."""

    def __init__(self, metrics: ServiceMetrics):
        self.m = metrics

    def collect(self):
        state = self.m._state
        up = GaugeMetricFamily("congeal_store_up", "1 if the job store answered this scrape")
        try:
            jobs = GaugeMetricFamily("congeal_jobs", "jobs queued or running now", labels=["state"])
            counts = {JobStatus.queued: 0, JobStatus.running: 0}
            for jid in state.store.active_ids():
                rec = state.store.get(jid)
                if rec is not None and rec.status in counts:
                    counts[rec.status] += 1
            for st, n in counts.items():
                jobs.add_metric([st.value], n)
            depth = GaugeMetricFamily("congeal_queue_depth", "job tasks waiting to be taken by a worker",
                                      labels=["queue"])
            for queue, n in self._queue_depths(state).items():
                depth.add_metric([queue], n)
            workers = GaugeMetricFamily("congeal_workers", "workers whose heartbeat is current")
            workers.add_metric([], len(state.store.live_workers()))
            attempts = CounterMetricFamily("congeal_job_attempts", "job attempts run to their end, by outcome",
                                           labels=["kind", "outcome"])
            device = CounterMetricFamily("congeal_device_seconds", "wall time of ended attempts times the "
                                         "devices each held (GPU-seconds on device=\"cuda\")",
                                         labels=["kind", "device"])
            for (name, labels), v in sorted(self.m._usage.totals().items()):
                fam = {"attempts": attempts, "device_seconds": device}.get(name)
                if fam is not None:
                    fam.add_metric([v for _, v in labels], v)
        except Exception:
            log.exception("metrics: the job store did not answer")
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield from (up, jobs, depth, workers, attempts, device)

    def _queue_depths(self, state) -> dict[str, int]:
        if state.embedded is not None:
            return {"embedded": state.embedded.pending()}
        out = {}
        for kind in JobKind:
            q = queue_for(kind, state.settings)
            pipe = self.m._redis.pipeline(transaction=False)
            for suffix in _PRIORITY_SUFFIXES:
                pipe.llen(q + suffix)
            out[q] = sum(pipe.execute())
        return out


def _route(scope) -> str:
    """The route template (``/jobs/{job_id}``), so that ids do not make a label value each."""
    route = scope.get("route")
    if route is not None and getattr(route, "path", None):
        return route.path
    return "/static" if scope.get("path", "").startswith("/static/") else "unmatched"


class RequestMiddleware:
    """Plain ASGI (no task of its own, so the endpoint shares the request's log context)."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        status = 500  # unless a response starts: an exception escaped

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REQUEST_ID_HEADER.lower().encode(), rid.encode())]}
            await send(message)

        t0 = time.perf_counter()
        with log_context(request_id=rid):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                dt = time.perf_counter() - t0
                route = _route(scope)
                self.metrics.latency.labels(scope["method"], route, str(status)).observe(dt)
                ids = {k: v for k, v in (scope.get("path_params") or {}).items()
                       if k in ("job_id", "model_id", "dataset_id")}
                tenant = (scope.get("state") or {}).get("tenant")
                bind(**ids)
                log.info("%s %s %s", scope["method"], scope["path"], status,
                         extra={"route": route, "status": status, "duration_ms": round(dt * 1000, 1),
                                **({"tenant": tenant} if tenant else {})})
