"""Property-based run over the OpenAPI schema (schemathesis): whatever it sends, never a 5xx.

The API runs as a real ``uvicorn`` process on 127.0.0.1 against real Redis (no worker: jobs
stay queued). Examples per operation are bounded so the whole module stays under a minute.
"""
from __future__ import annotations

import os

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings
from service_testlib import auth

from service.app import create_app
from service.devserver import start_api

pytestmark = pytest.mark.integration

# The schema needs no running app; requests go to the server below.
schema = schemathesis.openapi.from_dict(create_app().openapi())


@pytest.fixture(scope="module")
def server(make_env):
    env = make_env(rate_limit_per_minute=0, max_upload_bytes=1_000_000, max_jobs_in_flight_per_key=1_000_000)
    proc, base = start_api({**os.environ, **env.vars})
    yield base
    proc.terminate()
    proc.wait(timeout=30)
    err = proc.stderr.read()
    assert "Traceback" not in err, err[-3000:]  # an exception the handlers turned into a 4xx is fine; a crash is not


@schema.parametrize()
@settings(max_examples=50, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_input_makes_the_api_answer_5xx(case, server):
    for headers in (auth(), None):  # with a valid key (reaches the handlers) and without (401 path)
        r = case.call(base_url=server, headers=headers, timeout=30)
        if case.formatted_path == "/readyz" and r.status_code == 503:
            continue  # documented: no worker consumes this run's queue, so it is not ready
        assert r.status_code < 500, (case.method, case.formatted_path, r.status_code, r.text[:500])
