"""``POST /pairs`` with ``method=semantic`` through the real job machinery (Redis, a Celery worker):
a job that trains on its images and leaves a model, dense maps and flows in the results, points
moved both ways with the dense map in the API process, a second job reusing the first one's model,
and refusals that name the problem."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from service_testlib import auth, png_bytes, wait_job

pytestmark = pytest.mark.integration

TINY = {"synthetic_steps": 2, "weak_steps": 1, "batch": 2, "size": 16}


@pytest.fixture
def shapes(stroke_images):
    """The upload parts of ``n`` stroke images named 0.png, 1.png, ..."""
    return lambda n=4: [("files", (f"{i}.png", png_bytes(a), "image/png")) for i, a in enumerate(stroke_images(n))]


def test_semantic_job_trains_maps_densely_and_its_model_is_reused(client, shapes):
    pairs = json.dumps([["0.png", "1.png", "ab"], ["2.png", "3.png", "cd"]])
    r = client.post("/pairs", files=shapes(), data={"method": "semantic", "pairs": pairs, "min_confidence": "0",
                                                     "options": json.dumps(TINY),
                                                     "points": json.dumps({"target": [[6, 7]], "source": [[8, 9]]})})
    assert r.status_code == 202, r.text
    jid = r.json()["job"]["id"]
    done = wait_job(client, jid, timeout=180)
    assert done["status"] == "succeeded", done
    res = client.get(f"/pairs/{jid}").json()
    assert res["method"] == "semantic" and res["model_job"] == jid and res["n_pairs"] == 2
    e = res["pairs"][0]
    assert e["warp"]["type"] == "affine+tps" and e["aligned"]
    flow = client.get(e["links"]["flow"])
    assert flow.status_code == 200
    f = np.load(io.BytesIO(flow.content))
    assert f.shape == (24, 24, 2)
    assert np.allclose(f[7, 6], e["points"]["target_in_source"][0], atol=1e-3)
    there = client.post(e["links"]["points"], json={"points": [[6, 7]], "direction": "target_to_source"}).json()
    assert np.allclose(there["points"], e["points"]["target_in_source"], atol=1e-6)
    back = client.post(e["links"]["points"], json={"points": there["points"], "direction": "source_to_target"}).json()
    assert np.allclose(back["points"], [[6, 7]], atol=1e-2)

    again = client.post("/pairs", files=shapes()[:2], data={"method": "semantic", "min_confidence": "0",
                                                             "options": json.dumps({"model_job": jid})})
    assert again.status_code == 202, again.text
    jid2 = again.json()["job"]["id"]
    assert wait_job(client, jid2, timeout=120)["status"] == "succeeded"
    res2 = client.get(f"/pairs/{jid2}").json()
    assert res2["model_job"] is None  # it trained nothing
    assert np.allclose(res2["pairs"][0]["warp"]["tps_dst"], e["warp"]["tps_dst"], atol=1e-5)  # the same model

    # refusals: each names its problem
    cases = [
        ({"model_job": "0" * 32}, "no such job of yours"),
        ({"model_job": jid2}, "left no pair model"),
        ({"model_job": jid, "weak_steps": 3}, "drop weak_steps"),
        ({"starts": 3}, "not options of method semantic"),
        ({"synthetic_steps": 10 ** 6}, "synthetic_steps"),
    ]
    for opts, text in cases:
        bad = client.post("/pairs", files=shapes()[:2], data={"method": "semantic", "options": json.dumps(opts)})
        assert bad.status_code == 422 and text in bad.text, (opts, bad.text)
    other = client.post("/pairs", files=shapes()[:2], headers=auth("bob"),
                        data={"method": "semantic", "options": json.dumps({"model_job": jid})})
    assert other.status_code == 422 and "no such job of yours" in other.text  # another tenant's model
