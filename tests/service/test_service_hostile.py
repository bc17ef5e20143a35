"""A hostile-input corpus, generated here, against the real API on real Redis.

Every case must get a 4xx whose message names the problem (or, for the inputs the
service documents as acceptable, a 202), leave the service healthy, and write no file
outside the job's own folder; a refused upload leaves no folder at all.
"""
from __future__ import annotations

import io
import struct
import tarfile
import uuid
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from service_testlib import SAMPLES, auth, png_bytes, tar_bytes

from service.app import create_app

GOOD = SAMPLES[0].read_bytes()
ESCAPE = f"congeal-escape-{uuid.uuid4().hex[:8]}.png"  # a name no test run could have left behind


@pytest.fixture(scope="module")
def env(make_env):
    return make_env(max_upload_bytes=3_000_000, max_pixels_per_image=1_000_000, max_archive_members=20,
                    max_uncompressed_bytes=30_000_000, max_jobs_in_flight_per_key=10_000)


@pytest.fixture(scope="module")
def api(env):
    (env.data_dir / "jobs").mkdir(parents=True, exist_ok=True)  # so each case compares like with like
    with TestClient(create_app(env.settings()), raise_server_exceptions=False, headers=auth()) as c:
        yield c


def _png_header(w: int, h: int) -> bytes:
    """A valid PNG signature and IHDR for a w x h 8-bit grey image, and almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _zip(members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _zip_symlink() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.png", GOOD)
        info = zipfile.ZipInfo("b.png")
        info.external_attr = (0o120777 << 16)  # S_IFLNK: unzip would create a link
        z.writestr(info, "/etc/passwd")
    return buf.getvalue()




def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _bomb() -> bytes:
    # 25 MB of zeros deflate to ~25 kB (ratio ~1000): below the upload limit, far above the ratio limit.
    return _zip({"a.png": GOOD, "bomb.png": b"\0" * 25_000_000})


def _gray(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w), dtype=np.uint8)


REFUSED = [
    # (case, files, expected status, words the message must contain)
    ("truncated png", [("a.png", GOOD), ("b.png", GOOD[: len(GOOD) // 2])], 422, ["b.png"]),
    ("corrupt png", [("a.png", GOOD), ("b.png", GOOD[:40] + bytes(range(256)) * 4)], 422, ["b.png"]),
    ("text named .png", [("a.png", GOOD), ("notes.png", b"just some text, not an image\n" * 10)], 422,
     ["notes.png", "not a readable image"]),
    ("100000x100000 png header", [("a.png", GOOD), ("huge.png", _png_header(100_000, 100_000))], 413, ["huge.png"]),
    ("zip bomb", [("bomb.zip", _bomb())], 413, ["bomb.png"]),
    ("../ in zip", [("x.zip", _zip({"a.png": GOOD, f"../{ESCAPE}": GOOD}))], 422, [ESCAPE, ".."]),
    ("absolute path in zip", [("x.zip", _zip({"a.png": GOOD, f"/tmp/{ESCAPE}": GOOD}))], 422,
     [ESCAPE, "absolute"]),
    ("symlink in zip", [("x.zip", _zip_symlink())], 413, ["b.png", "link"]),
    ("../ in tar", [("x.tar", tar_bytes([("a.png", GOOD), (f"../../{ESCAPE}", GOOD)]))], 422, [ESCAPE, ".."]),
    ("absolute path in tar", [("x.tar.gz", tar_bytes([("a.png", GOOD), (f"/tmp/{ESCAPE}", GOOD)], "w:gz"))], 422,
     [ESCAPE, "absolute"]),
    ("symlink in tar", [("x.tar", tar_bytes([("a.png", GOOD), _link("b.png", "/etc/passwd")]))], 422,
     ["b.png", "link"]),
    ("hard link in tar", [("x.tar", tar_bytes([("a.png", GOOD), _link("b.png", "a.png", tarfile.LNKTYPE)]))], 422,
     ["b.png", "link"]),
    ("empty zip", [("empty.zip", _zip({}))], 422, ["empty.zip", "no images"]),
    ("empty tar", [("empty.tar", tar_bytes([]))], 422, ["empty.tar", "no images"]),
    ("zero-byte file", [("a.png", GOOD), ("z.png", b"")], 413, ["z.png", "empty"]),
    ("too many archive members", [("many.zip", _zip({f"{i}.png": GOOD for i in range(21)}))], 413,
     ["many.zip", "members"]),
    ("not an archive at all", [("x.zip", b"PK\x03\x04 but nothing after")], 422, ["x.zip"]),
    ("one image", [("a.png", GOOD)], 422, ["at least 2"]),
    ("executable upload", [("a.png", GOOD), ("run.sh", b"#!/bin/sh\nrm -rf /\n")], 422, ["run.sh"]),
    ("hidden file name", [("a.png", GOOD), (".htaccess.png", GOOD)], 422, ["htaccess"]),
    ("path in a part's file name", [("a.png", GOOD), (f"../../{ESCAPE}", GOOD)], None, []),
]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def _assert_healthy(api):
    assert api.get("/healthz").status_code == 200
    assert api.get("/jobs", params={"limit": 1}).status_code == 200


@pytest.mark.parametrize("case,files,status,words", REFUSED, ids=[c[0] for c in REFUSED])
def test_hostile_upload_is_refused_cleanly(api, env, case, files, status, words):
    outside = env.data_dir.parent
    before, before_outside = _tree(env.data_dir), {p.name for p in outside.iterdir()}
    r = api.post("/jobs", files=[("files", (n, d, "application/octet-stream")) for n, d in files])
    if status is None:
        # A path in a multipart file name is reduced to its base name (documented): the upload is
        # two ordinary images, accepted, and stored inside the job's input folder only.
        assert r.status_code == 202, r.text
        jid = r.json()["id"]
        assert (env.data_dir / "jobs" / jid / "input" / ESCAPE).is_file()
        assert api.delete(f"/jobs/{jid}").status_code == 202
    else:
        assert r.status_code == status, (case, r.status_code, r.text)
        detail = str(r.json()["detail"])
        for w in words:
            assert w in detail, (case, detail)
        assert _tree(env.data_dir) == before, "a refused upload left files behind"
    assert {p.name for p in outside.iterdir()} == before_outside  # nothing next to the data dir
    assert not Path("/tmp", ESCAPE).exists() and not (env.data_dir / ESCAPE).exists()
    _assert_healthy(api)


def test_mixed_sizes_and_channel_counts_are_accepted(api, env):
    """Documented acceptance: sizes and channels may differ; the job works at one size, colour
    if any input is colour (grey images are promoted)."""
    rgb = np.random.default_rng(1).integers(0, 255, (40, 30, 3), dtype=np.uint8)
    rgba = np.random.default_rng(2).integers(0, 255, (20, 20, 4), dtype=np.uint8)
    files = [("files", ("g.png", png_bytes(_gray(28, 28)), "image/png")),
             ("files", ("rgb.png", png_bytes(rgb), "image/png")),
             ("files", ("rgba.png", png_bytes(rgba), "image/png")),
             ("files", ("wide.png", png_bytes(_gray(10, 60)), "image/png"))]
    r = api.post("/jobs", files=files)
    assert r.status_code == 202, r.text
    assert r.json()["n_images"] == 4
    assert api.delete(f"/jobs/{r.json()['id']}").status_code == 202


@pytest.mark.parametrize("field,value", [
    ("budget", "ten"), ("budget", "-3"), ("budget", "1e9"), ("seed", "1.5"), ("seed", "-1"),
    ("warp", "5"), ("warp", "shear"), ("method", "[]"), ("max_side", "99999999999999999999"),
    ("time_limit_s", "0"), ("reference", "nope.png"), ("colour", "blue"),
])
def test_wrong_option_types_are_422_naming_the_field(api, env, field, value):
    before = _tree(env.data_dir)
    r = api.post("/jobs", files=[("files", (p.name, p.read_bytes(), "image/png")) for p in SAMPLES[:2]],
                 data={field: value})
    assert r.status_code == 422, (field, value, r.text)
    assert field in str(r.json()["detail"])
    assert _tree(env.data_dir) == before
    _assert_healthy(api)


def test_allowed_formats_are_checked_by_content_and_by_member_name(env):
    from PIL import Image

    def encoded(fmt: str) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(_gray(16, 16)).save(buf, format=fmt)
        return buf.getvalue()

    with TestClient(create_app(env.settings(allowed_formats="png")), headers=auth()) as c:
        def post(files):
            return c.post("/jobs", files=[("files", (n, d, "application/octet-stream")) for n, d in files])

        r = post([("a.png", GOOD), ("b.jpg", encoded("JPEG"))])
        assert r.status_code == 422 and "b.jpg" in str(r.json()["detail"]), r.text
        r = post([("a.png", GOOD), ("b.png", encoded("BMP"))])  # renamed: caught by its content
        assert r.status_code == 422 and "b.png" in r.json()["detail"] and "BMP" in r.json()["detail"], r.text
        r = post([("x.zip", _zip({"a.png": GOOD, "b.tif": encoded("TIFF")}))])
        assert r.status_code == 422 and "b.tif" in r.json()["detail"], r.text
        r = post([("a.png", GOOD), ("b.png", GOOD)])
        assert r.status_code == 202, r.text
        assert c.delete(f"/jobs/{r.json()['id']}").status_code == 202
    with pytest.raises(ValueError):
        env.settings(allowed_formats="png,gif")
