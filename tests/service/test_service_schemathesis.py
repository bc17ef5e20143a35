"""A bounded fuzz run over the OpenAPI schema (schemathesis): whatever it sends, never a 5xx.

The API runs as a real ``uvicorn`` process on 127.0.0.1 against real Redis, with a real worker
that has trained one small job, so the result and model routes are reached with an id that
exists, not only 404s. Every operation in the schema is fuzzed, and each example is sent
three times:

1. as generated, with a valid key (reaches the handlers);
2. as generated, without a key (the 401 path);
3. an *edge* variant, with the key: the job or model id is one that exists (or that id with a
   trailing newline), one integer query parameter is pushed to a 64-bit edge (2**63 - 1, 2**63,
   1e22, -2**63, 10**30), and an upload carries one file of a small hostile corpus (an ``.npz`` named
   ``.npy``, duplicate archive members, a tar bomb, a truncated PNG, NaN in an array, a corrupt
   ``.tar.xz``). These are the inputs the generator alone does not reach; issue 21's two 5xx were
   among them.

Bounded so that CI always gets an answer: 20 generated examples an operation (plus schemathesis's
coverage cases, a fixed set per operation), derandomized, no shrinking (a failure is reported as
found), 10 s per request, 60 s per operation. The server's log goes to a file, not a pipe: the
earlier version of this module hung because a pipe nobody read filled up with the tracebacks of
the very 500s it was looking for, and the server then blocked (``service.devserver``).
"""
from __future__ import annotations

import io
import itertools
import os
import time
import warnings
import zipfile
from urllib.parse import quote

import httpx
import numpy as np
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, settings
from service_testlib import SAMPLES, auth, files_for, wait_job, tar_bytes

from service.app import create_app
from service.devserver import server_log, start_api

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

# The schema needs no running app; requests go to the server below.
SPEC = create_app().openapi()
schema = schemathesis.openapi.from_dict(SPEC)
OPERATIONS = {(m.upper(), p) for p, ops in SPEC["paths"].items() for m in ops}
INT_QUERY = {(m.upper(), p): [q["name"] for q in op.get("parameters", [])
                              if q["in"] == "query" and q.get("schema", {}).get("type") == "integer"]
             for p, ops in SPEC["paths"].items() for m, op in ops.items()}
EDGE_INTS = [str(2**63 - 1), str(2**63), "1e22", str(-(2**63)), str(10**30)]


def _npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, a=np.zeros((3, 8, 8), "u1"))
    return buf.getvalue()


def _npy_nan() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.full((2, 8, 8), np.nan, "f4"))
    return buf.getvalue()


def _zip_dup() -> bytes:
    buf = io.BytesIO()
    good = SAMPLES[0].read_bytes()
    with zipfile.ZipFile(buf, "w") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for name in ("a.png", "a/b.png", "a\\b.png", "a.png"):
            z.writestr(name, good)
    return buf.getvalue()




GOOD = SAMPLES[0].read_bytes()
HOSTILE_UPLOADS = [
    [("arr.npy", _npz())],
    [("x.zip", _zip_dup())],
    [("x.tar.gz", tar_bytes([("a.png", GOOD), ("bomb.png", b"\0" * 900_000), ("b.png", GOOD)], "w:gz"))],
    [("a.png", GOOD), ("b.png", GOOD[: len(GOOD) // 2])],
    [("nan.npy", _npy_nan())],
    [("x.tar.xz", tar_bytes([("a.png", GOOD), ("b.png", GOOD)], "w:xz")[:60] + bytes(300))],
]


@pytest.fixture(scope="module")
def server(make_env, start_worker):
    env = make_env(rate_limit_per_minute=0, max_upload_bytes=1_000_000, max_jobs_in_flight_per_key=1_000_000,
                   sync_inference_timeout_s=2)
    start_worker(env, name="fuzz-worker", wait=False)  # starts while the API does
    proc, base = start_api({**os.environ, **env.vars})
    t0 = time.monotonic()
    with httpx.Client(base_url=base, headers=auth(), timeout=30) as c:
        # A job that exists and has succeeded (its results and model can be read), trained cheaply.
        trained = c.post("/jobs", files=files_for(SAMPLES[:4]), data={"method": "lsc", "budget": "2"}).json()["id"]
        done = wait_job(c, trained, timeout=120)
        assert done["status"] == "succeeded", done
    print(f"fuzz server ready with a trained job in {time.monotonic() - t0:.1f} s")
    yield {"base": base, "trained": trained, "env": env}
    proc.terminate()
    proc.wait(timeout=30)
    err = server_log(proc)
    assert "Traceback" not in err, err[-3000:]  # an exception the handlers turned into a 4xx is fine; a crash is not


def test_every_operation_of_the_schema_is_fuzzed():
    fuzzed = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
    assert fuzzed == OPERATIONS and len(OPERATIONS) >= 13, OPERATIONS ^ fuzzed


_turn = itertools.count()  # picks the edge values deterministically, example after example


def _fresh_job(base: str) -> str:
    """A queued job of its own for DELETE to cancel and purge (the trained one must survive)."""
    with httpx.Client(base_url=base, headers=auth(), timeout=30) as c:
        r = c.post("/jobs", files=files_for(SAMPLES[:2]), data={"method": "lsc", "budget": "1"})
        assert r.status_code == 202, r.text
        return r.json()["id"]


def _edge_request(case, srv) -> httpx.Response:
    i = next(_turn)
    method, template = case.method.upper(), case.path
    params = {}
    for k, v in case.path_parameters.items():
        if k in ("job_id", "model_id"):
            v = _fresh_job(srv["base"]) if method == "DELETE" else srv["trained"]
            v = v + "\n" if i % 4 == 3 else v
        params[k] = quote(str(v), safe="")
    path = template.format(**params)
    query = dict(case.query or {})
    ints = INT_QUERY.get((method, template), [])
    if ints:  # one integer at its edge, the others left out (their defaults): so it is that one that is judged
        for name in ints:
            query.pop(name, None)
        query[ints[i % len(ints)]] = EDGE_INTS[(i // len(ints)) % len(EDGE_INTS)]
    kw = {}
    if method == "POST":
        kw["files"] = [("files", (n, d, "application/octet-stream")) for n, d in HOSTILE_UPLOADS[i % len(HOSTILE_UPLOADS)]]
    with httpx.Client(base_url=srv["base"], headers=auth(), timeout=10) as c:
        return c.request(method, path, params=query, **kw)


def _ok(case, r) -> bool:
    if case.path == "/readyz" and r.status_code == 503:
        return True  # documented: not ready while the worker is still starting
    return r.status_code < 500


@schema.parametrize()
@settings(max_examples=20, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_no_input_makes_the_api_answer_5xx(case, server):
    for headers in (auth(), None):  # with a valid key (reaches the handlers) and without (401 path)
        r = case.call(base_url=server["base"], headers=headers, timeout=10)
        assert _ok(case, r), (case.method, case.formatted_path, r.status_code, r.text[:500])
    r = _edge_request(case, server)
    assert _ok(case, r), ("edge", r.request.method, str(r.request.url), r.status_code, r.text[:500])
