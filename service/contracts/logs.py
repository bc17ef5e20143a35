"""Structured logs for the API and the worker: one line per event, ``logfmt`` or JSON.

Every line carries the request and job it belongs to, from a context variable set where the work
starts (the API's request middleware, :meth:`JobRunner.run`), so a job can be followed from the
``POST /jobs`` that created it to the worker that ran it::

    ts=2025-01-01T12:00:00.123Z level=INFO logger=congeal.runner msg="job 9e9e...: succeeded" job_id=9e9e... request_id=4f1c...

Torch-free and FastAPI-free: the worker imports it.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["log_context", "bind", "current", "StructuredFormatter", "configure_logging", "LOG_FORMATS"]

LOG_FORMATS = ("logfmt", "json")
_context: ContextVar[dict] = ContextVar("congeal_log_context", default={})
# What every LogRecord has; anything else on a record was passed as ``extra=`` and is logged as a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


@contextmanager
def log_context(**fields):
    """Fields for every line logged inside the block (this thread or task; None values are left out)."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def bind(**fields) -> None:
    """Add fields to the current context until the enclosing :func:`log_context` ends."""
    _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})


def current(name: str) -> str | None:
    """A field of the current context (e.g. the request id), or None."""
    return _context.get().get(name)


def _logfmt_value(v) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    if s and not any(c in s for c in ' ="\\\n\r\t'):
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r") + '"'


class StructuredFormatter(logging.Formatter):
    """``logfmt`` (``key=value`` pairs, values quoted when needed) or one JSON object a line."""

    def __init__(self, fmt: str = "logfmt"):
        super().__init__()
        if fmt not in LOG_FORMATS:
            raise ValueError(f"log format {fmt!r}: one of {', '.join(LOG_FORMATS)}")
        self.fmt = fmt

    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        fields = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z",
                  "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        fields.update(_context.get())
        fields.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        if self.fmt == "json":
            return json.dumps(fields, default=str)
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in fields.items())


def configure_logging(level: str | int = "INFO", fmt: str = "logfmt", stream=None) -> None:
    """Send every logger's records (uvicorn's and Celery's too) through one structured handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(StructuredFormatter(fmt))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else str(level).upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
