"""Method ``dense`` through the API (embedded mode: the real app, its real training child, no mocks):
a job, ``POST /jobs/{id}/points``, the dense files, and the refusals."""
from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.contracts import METHOD_MAX_IMAGES, METHODS, Settings
from service_testlib import wait_job

pytestmark = pytest.mark.integration
pytest.importorskip("skimage")


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def test_the_api_cap_is_the_cores():
    from models.dense.asic import MAX_IMAGES

    assert "dense" in METHODS and METHOD_MAX_IMAGES["dense"] == MAX_IMAGES


@pytest.fixture(scope="module")
def dense_job(tmp_path_factory):
    from models.dense.synthetic import make_collection

    col = make_collection("chelsea", n=6, size=32, seed=1, n_keypoints=4)
    u8 = (col.images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    # Uploaded larger than the working size (48 x 40 -> 32 x 27), so input and working pixels differ.
    files = [("files", (f"im{i}.png", _png(np.asarray(Image.fromarray(a).resize((40, 48)))), "image/png"))
             for i, a in enumerate(u8)]
    s = Settings(redis_url=None, allow_open=True, data_dir=tmp_path_factory.mktemp("dense"), device="cpu")
    with TestClient(create_app(s)) as c:
        r = c.post("/jobs", files=files, data={"method": "dense", "budget": "10", "max_side": "32"})
        assert r.status_code == 202, r.text
        jid = r.json()["id"]
        assert wait_job(c, jid, timeout=180)["status"] == "succeeded"
        yield c, jid, col


def test_points_transfer_between_images_of_a_dense_job(dense_job):
    c, jid, col = dense_job
    pts = [[10.0, 12.0], [20.5, 15.0]]
    r = c.post(f"/jobs/{jid}/points", json={"source": "im0.png", "points": pts, "targets": ["im3.png", 5],
                                            "units": "working"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["source"] == "im0.png" and body["index"] == 0 and body["size"] == [32, 27]
    assert body["units"] == "working" and body["input_size"] == [48, 40]
    assert [t["name"] for t in body["targets"]] == ["im3.png", "im5.png"]
    flows = np.load(io.BytesIO(c.get(f"/jobs/{jid}/dense/flows.npy").content))
    masks = np.load(io.BytesIO(c.get(f"/jobs/{jid}/dense/masks.npy").content))
    assert flows.shape == (6, 32, 27, 2)
    from models.dense.transfer import transfer_points

    assert np.allclose(body["targets"][0]["points"], transfer_points(flows, 0, 3, pts, masks))
    # The default: the images' own pixels, the resize's geometry either side of the same transfer.
    sx, sy = 40 / 27, 48 / 32
    inp = [[(x + 0.5) * sx - 0.5, (y + 0.5) * sy - 0.5] for x, y in pts]
    r2 = c.post(f"/jobs/{jid}/points", json={"source": "im0.png", "points": inp, "targets": ["im3.png"]}).json()
    assert r2["units"] == "input" and r2["targets"][0]["input_size"] == [48, 40]
    want = transfer_points(flows, 0, 3, pts, masks)
    got = np.asarray(r2["targets"][0]["points"])
    assert np.allclose((got[:, 0] + 0.5) / sx - 0.5, want[:, 0]) and np.allclose((got[:, 1] + 0.5) / sy - 0.5, want[:, 1])
    every = c.post(f"/jobs/{jid}/points", json={"source": 2, "points": pts}).json()
    assert [t["index"] for t in every["targets"]] == [0, 1, 3, 4, 5]
    for f in ("atlas.png", "transfer.png"):
        g = c.get(f"/jobs/{jid}/dense/{f}")
        assert g.status_code == 200 and g.headers["content-type"] == "image/png"


@pytest.mark.parametrize("body,status,text", [
    ({"source": "nope.png", "points": [[1, 1]]}, 422, "not the name"),
    ({"source": 9, "points": [[1, 1]]}, 422, "out of range"),
    ({"source": 0, "points": [[40, 1]]}, 422, "outside"),  # x in [0, 39] as uploaded
    ({"source": 0, "points": [[27, 1]], "units": "working"}, 422, "outside"),
    ({"source": 0, "points": [[1, 1]], "units": "cm"}, 422, "units"),
    ({"source": 0, "points": []}, 422, "points"),
    ({"source": 0, "points": [[1, 1]], "extra": 1}, 422, "extra"),
])
def test_bad_point_requests_say_what_is_wrong(dense_job, body, status, text):
    c, jid, _ = dense_job
    r = c.post(f"/jobs/{jid}/points", json=body)
    assert r.status_code == status and text in r.text, r.text


def test_points_of_an_unknown_job_and_unknown_files_are_404(dense_job):
    c, jid, _ = dense_job
    assert c.post("/jobs/" + "0" * 32 + "/points", json={"source": 0, "points": [[1, 1]]}).status_code == 404
    assert c.get(f"/jobs/{jid}/dense/secrets.txt").status_code == 422
    assert c.post(f"/jobs/{jid}/points", content=b"x", headers={"content-type": "text/plain"}).status_code == 415


def test_a_collection_above_the_dense_cap_is_refused_at_once(dense_job):
    c, _, _ = dense_job
    n = METHOD_MAX_IMAGES["dense"] + 1
    tiny = _png(np.zeros((8, 8, 3), np.uint8))
    r = c.post("/jobs", files=[("files", (f"{i}.png", tiny, "image/png")) for i in range(n)],
               data={"method": "dense"})
    assert r.status_code == 422 and "at most 64 images" in r.text and "dprc" in r.text, r.text


@pytest.mark.parametrize("data,text", [
    ({"method": "dense", "features": "vit"}, "no ViT weights"),  # this service has none
    ({"method": "dense", "features": "sift"}, "features"),
    ({"method": "dprc", "features": "hog"}, "method dense only"),
])
def test_dense_options_are_checked_at_submission(dense_job, data, text):
    c, _, col = dense_job
    files = [("files", (f"{i}.png", _png(np.full((8, 8, 3), 40 * i, np.uint8)), "image/png")) for i in range(3)]
    r = c.post("/jobs", files=files, data=data)
    assert r.status_code == 422 and text in r.text, r.text


def test_a_dense_job_uses_the_operators_vit_weights(tmp_path):
    """features=vit reads the file the operator configured (CONGEAL_VIT_WEIGHTS), never a client's path."""
    from safetensors.torch import save_file

    from models.dense.synthetic import make_collection
    from models.dense.vit import ViT

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in ViT(64, 1, 1, 8, 4, 64).state_dict().items()},
              str(tmp_path / "vit.safetensors"))
    col = make_collection("chelsea", n=4, size=32, seed=2, n_keypoints=4)
    u8 = (col.images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    files = [("files", (f"im{i}.png", _png(a), "image/png")) for i, a in enumerate(u8)]
    s = Settings(redis_url=None, allow_open=True, data_dir=tmp_path / "data", device="cpu",
                 vit_weights=tmp_path / "vit.safetensors")
    with TestClient(create_app(s)) as c:
        r = c.post("/jobs", files=files, data={"method": "dense", "budget": "5", "features": "vit"})
        assert r.status_code == 202, r.text
        job = wait_job(c, r.json()["id"], timeout=180)
        assert job["status"] == "succeeded", job
        notes = job["metrics"]["notes"]
        assert any("(vit features)" in n for n in notes), notes
