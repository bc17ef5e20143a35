"""End to end through HTTP, real Redis and a separate ``celery worker`` process."""
from __future__ import annotations

import base64
import io
import json
import shutil
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from service.contracts import JobKind, JobRecord, JobStatus
from service_testlib import SAMPLES, bilinear_backward, files_for, pid_alive, wait_job

pytestmark = pytest.mark.integration

TRAIN = SAMPLES[:24]


@pytest.fixture(scope="module")
def trained(client):
    """One training job shared by the result and inference tests, with every poll kept."""
    # 40 steps of 24 images: long enough on the CPU trainer (~0.1 s a step) that polls every 0.25 s see
    # it training through the progress relay's 0.5 s throttle (2 steps were over before a poll could).
    r = client.post("/jobs", files=files_for(TRAIN), data={"budget": "40", "warp": "homography"})
    assert r.status_code == 202, r.text
    seen: list[dict] = []
    job = wait_job(client, r.json()["id"], seen=seen)
    assert job["status"] == "succeeded", job
    return job, seen


def test_worker_is_ready(client):
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready" and r.json()["workers"], r.text


def test_polling_sees_progress_then_success(trained, worker_env):
    job, seen = trained
    training = [j["progress"] for j in seen if j["status"] == "running" and j["progress"]["stage"] == "training"]
    assert training, [j["status"] for j in seen]
    p = training[-1]
    assert p["total"] == 40 and 1 <= p["step"] <= 40 and p["epoch"] >= 1 and p["loss"] is not None
    assert job["started_at"] and job["finished_at"] and job["created_at"] <= job["started_at"] <= job["finished_at"]
    m = job["metrics"]
    assert m["n_images"] == len(TRAIN) and m["apsnr_before"] is not None and m["apsnr_after"] is not None
    assert {"mean", "median", "p95", "max", "n_outliers"} <= set(m["residual_summary"])
    assert m["consistency_summary"]["probe_sigma"] == 0.1 and m["consistency_summary"]["ratio"] > 0
    assert job["model_id"] == job["id"] and job["links"]["align_with_model"]
    assert [a["outcome"] for a in job["attempts"]] == ["succeeded"]
    assert job["attempts"][0]["worker"].startswith(worker_env.worker.name + "@")  # the separate worker ran it


def test_dprc_options_reach_the_worker_and_the_saved_model(client, worker_env):
    r = client.post("/jobs", files=files_for(TRAIN[:12]), data={"budget": "1", "passes": "1", "reframe": "0",
                                                                   "width": "1", "batch_size": "8"})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["options"]["passes"] == 1 and job["options"]["reframe"] == 0 and job["options"]["width"] == 1
    assert job["progress"]["total"] == 2  # one epoch of 12 images in batches of 8 (256: one step)
    cfg = json.loads((worker_env.data_dir / "jobs" / job["id"] / "output" / "model" / "config.json").read_text())
    assert cfg["passes"] == 1 and cfg["destnet"]["hidden"] == 48  # width 1: Table 1's regressor


def test_downloaded_transforms_reproduce_the_downloaded_aligned_images(client, trained):
    job, _ = trained
    t = client.get(job["links"]["transforms"]).json()
    assert "backward map" in t["convention"] and len(t["images"]) == len(TRAIN)
    H, W = t["output_size"]
    originals = {p.name: np.asarray(Image.open(p)) for p in TRAIN}
    moved = 0
    for im in t["images"]:
        r = client.get(job["links"]["aligned_image"].replace("{name}", im["name"]))
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        got = np.asarray(Image.open(io.BytesIO(r.content))).astype(np.float64)
        want = bilinear_backward(originals[im["name"]], im["matrix"], (H, W), im["fill"][0])
        assert got.shape == want.shape == (H, W)
        assert np.abs(got - want).max() <= 2.0, (im["name"], np.abs(got - want).max())
        moved += not np.allclose(im["matrix"], np.eye(3), atol=1e-3)
    assert moved > len(TRAIN) // 2  # the check above is not comparing identity warps


def test_result_downloads(client, trained):
    job, _ = trained
    links = job["links"]
    z = zipfile.ZipFile(io.BytesIO(client.get(links["aligned_zip"]).content))
    names = set(z.namelist())
    assert {p.name for p in TRAIN} <= names and "transforms.json" in names
    metrics = client.get(links["metrics"]).json()
    assert len(metrics["per_image"]) == len(TRAIN)
    for key in ("mean_before", "var_before", "mean_after", "var_after"):
        r = client.get(links[key])
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (28, 28)
    mean_b = np.asarray(Image.open(io.BytesIO(client.get(links["mean_before"]).content)))
    mean_a = np.asarray(Image.open(io.BytesIO(client.get(links["mean_after"]).content)))
    assert not np.array_equal(mean_a, mean_b)
    model = client.get(links["model"]).json()
    assert model["working_size"] == [28, 28] and model["warp"] == "homography"
    r = client.get(links["report"])
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert r.text.count('class="card"') == len(TRAIN) and "<script" not in r.text


@pytest.mark.parametrize("name", ["../../metrics.json", "..%2F..%2Fmetrics.json", "nope.png", "/etc/passwd"])
def test_one_image_by_name_never_leaves_the_job(client, trained, name):
    job, _ = trained
    r = client.get(f"/jobs/{job['id']}/aligned/{name}")
    assert r.status_code == 404 and "metrics" not in r.headers.get("content-type", "")


def test_sync_inference_with_the_trained_model(client, trained):
    job, _ = trained
    new = SAMPLES[40:43]  # images the model never saw
    r = client.post(f"{job['links']['align_with_model']}?include_images=true", files=files_for(new))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["job"]["status"] == "succeeded" and body["job"]["kind"] == "apply"
    assert body["job"]["model_id"] == job["id"]
    assert [i["name"] for i in body["images"]] == [p.name for p in new]
    H, W = body["output_size"]
    for im, p in zip(body["images"], new):
        png = np.asarray(Image.open(io.BytesIO(client.get(im["url"]).content))).astype(np.float64)
        inline = np.asarray(Image.open(io.BytesIO(base64.b64decode(im["png_base64"]))))
        assert np.array_equal(png, inline)
        want = bilinear_backward(np.asarray(Image.open(p)), im["matrix"], (H, W), im["fill"][0])
        assert np.abs(png - want).max() <= 2.0


def test_large_inference_batch_becomes_a_job(client, trained):
    job, _ = trained
    new = SAMPLES[30:36]  # 6 > CONGEAL_SYNC_INFERENCE_MAX_IMAGES=4
    r = client.post(job["links"]["align_with_model"], files=files_for(new))
    assert r.status_code == 202, r.text
    assert r.headers["location"] == r.json()["links"]["self"]
    done = wait_job(client, r.json()["id"])
    assert done["status"] == "succeeded" and done["kind"] == "apply" and done["n_images"] == 6
    t = client.get(done["links"]["transforms"]).json()
    assert [i["name"] for i in t["images"]] == [p.name for p in new]


def test_cancel_a_running_job_stops_its_training_process(client, worker_env):
    r = client.post("/jobs", files=files_for(SAMPLES[:16]), data={"budget": "500"})
    jid = r.json()["id"]
    running = wait_job(client, jid, until=lambda j: (j["progress"] or {}).get("stage") == "training"
                       or j["status"] in ("succeeded", "failed", "cancelled"))
    assert running["status"] == "running", running
    pid = worker_env.store().get(jid).attempts[-1].pid  # the training child: internal, so not in the API
    assert pid and pid_alive(pid)
    t0 = time.monotonic()
    c = client.delete(f"/jobs/{jid}")
    assert c.status_code == 202 and c.json()["cancel_requested"]
    done = wait_job(client, jid, timeout=30)
    assert done["status"] == "cancelled" and done["attempts"][-1]["outcome"] == "cancelled", done
    assert time.monotonic() - t0 < 15
    deadline = time.monotonic() + 5
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(pid)
    assert (worker_env.data_dir / "jobs" / jid / "input").is_dir()
    assert client.delete(f"/jobs/{jid}").status_code == 204  # over: a second DELETE purges it
    assert not (worker_env.data_dir / "jobs" / jid).exists() and client.get(f"/jobs/{jid}").status_code == 404


def test_a_job_over_its_time_limit_fails_with_a_readable_error(client):
    r = client.post("/jobs", files=files_for(SAMPLES[:16]), data={"budget": "500", "time_limit_s": "3"})
    done = wait_job(client, r.json()["id"], timeout=60)
    assert done["status"] == "failed" and done["error_type"] == "time_limit"
    assert "time limit of 3 s" in done["error"]
    assert done["metrics"] is None and done["links"]["transforms"] is None


def test_inference_with_a_damaged_model_fails_with_a_readable_error(client, trained, worker_env):
    """The artifact store lost a model's weights: the job fails, says why, and nothing crashes."""
    job, _ = trained
    store, data = worker_env.store(), worker_env.data_dir
    fake = JobRecord(id="f" * 32, kind=JobKind.align, owner="alice", status=JobStatus.succeeded,
                     result={"n_images": 24, "has_model": True})
    store.insert(fake)
    src, dst = data / "jobs" / job["id"] / "output" / "model", data / "jobs" / fake.id / "output" / "model"
    shutil.copytree(src, dst)
    for w in dst.glob("*.safetensors"):
        w.write_bytes(b"not a tensor file")
    r = client.post(f"/models/{fake.id}/align", files=files_for(SAMPLES[:2]))
    assert r.status_code == 500, r.text
    assert "inference failed" in r.json()["detail"]
    jid = r.json()["detail"].split("inference job ")[1].split()[0]
    failed = client.get(f"/jobs/{jid}").json()
    assert failed["status"] == "failed" and failed["error_type"] == "internal"
    # One line saying what broke (e.g. "inference failed: SafetensorError: ..."), not a traceback.
    assert failed["error"].startswith("inference failed: ") and "\n" not in failed["error"]
    assert client.get("/healthz").status_code == 200
