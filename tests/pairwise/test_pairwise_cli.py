"""``congeal pair`` end to end, and its errors."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from models.pairwise import synthetic as S
from pairlib import make_pair

CLI = [sys.executable, "-m", "congeal", "pair"]
pytest.importorskip("cv2")


def _run(*args):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair-cli")
    p = make_pair("coffee", rho=8, seed=11)
    for name, a in (("src.png", p.source), ("tgt.png", p.target)):
        Image.fromarray((a * 255 + 0.5).astype(np.uint8)).save(d / name)
    return d, p


def test_one_pair_writes_matrix_points_and_images(images, tmp_path):
    """With the default method, ``search``."""
    d, p = images
    out = tmp_path / "out"
    r = _run(d / "src.png", d / "tgt.png", "--out", out, "--device", "cpu", "--point", "10,20",
             "--source-point", "5.5,7", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "1 pair(s)" in r.stdout and "1 aligned" in r.stdout and str(out) in r.stdout
    doc = json.loads((out / "pairs.json").read_text())
    assert doc["method"] == "search"
    e = doc["pairs"][0]
    assert e["name"] == "pair" and e["aligned"] and e["source_name"] == "src.png"
    M = np.array(e["matrix"])
    assert S.corner_error(M, p.source_from_target, (96, 96)) < 0.5
    q = M @ [10, 20, 1]
    assert np.allclose(e["points"]["target_in_source"], [q[:2] / q[2]])
    assert np.allclose(e["points"]["source"], [[5.5, 7]])
    for f in ("warped", "overlay", "checkerboard"):
        assert (out / "pair" / f"{f}.png").is_file()


def test_a_pairs_file_with_a_learned_option(images, tmp_path):
    d, _ = images
    (d / "pairs.csv").write_text("source,target,name\nsrc.png,tgt.png,fwd\ntgt.png,src.png,back\n")
    out = tmp_path / "out"
    r = _run("--pairs", d / "pairs.csv", "--out", out, "--method", "learned", "--device", "cpu",
             "--option", "search_steps=[5]", "--option", "keypoints=16", "--quiet")
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "pairs.json").read_text())
    assert [e["name"] for e in doc["pairs"]] == ["fwd", "back"] and doc["method"] == "learned"
    assert all(np.isfinite(np.array(e["matrix"])).all() for e in doc["pairs"])


@pytest.mark.parametrize("args, msg", [
    (["only-one.png"], "give SOURCE and TARGET"),
    (["missing-a.png", "missing-b.png"], "no such image file"),
    (["a.png", "b.png", "--pairs", "x.csv"], "either SOURCE TARGET or --pairs"),
    (["--pairs", "nope.csv"], "no such pairs file"),
    (["x.png", "y.png", "--point", "1;2"], "expected X,Y"),
    (["x.png", "y.png", "--method", "nope"], "unknown method"),
])
def test_errors_are_one_line_and_status_2(tmp_path, args, msg):
    r = _run(*args, "--out", tmp_path / "out")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines[-1].startswith("congeal pair: error:") and msg in lines[-1], r.stderr
    assert sum("error" in line for line in lines) == 1
    assert not (tmp_path / "out").exists()
