"""The `congeal` CLI end to end on a tiny collection, and its errors."""
import json
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

CLI = [sys.executable, "-m", "congeal"]


def _run(*args, cwd=None):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def aligned_run(tmp_path_factory):
    """One `congeal align` run shared by the checks below (it is the slow part)."""
    from models.data import mnist_digits
    from models.perturb import make_pairs

    root = tmp_path_factory.mktemp("cli")
    pairs = make_pairs(mnist_digits(5, 12), 0.08, seed=4)
    d = root / "in"
    d.mkdir()
    for i, im in enumerate(pairs.images):
        Image.fromarray((im[0].numpy() * 255 + 0.5).astype(np.uint8)).save(d / f"digit_{i:02d}.png")
    out = root / "out"
    r = _run("align", d, "--out", out, "--epochs", "3", "--device", "cpu", "--seed", "1")
    return d, out, r


def test_align_writes_every_output(aligned_run):
    d, out, r = aligned_run
    assert r.returncode == 0, r.stderr
    assert "24 images aligned" in r.stdout and str(out) in r.stdout
    names = sorted(p.name for p in d.iterdir())
    for f in ("transforms.json", "metrics.json", "mean_before.png", "var_before.png", "mean_after.png",
              "var_after.png", "model/config.json", "model/aligner.safetensors", "model/pipeline.json"):
        assert (out / f).is_file(), f
    assert sorted(p.name for p in (out / "aligned").iterdir()) == names  # names preserved
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_images"] == 24 and m["method"] == "dprc" and m["warp"] == "homography"
    assert m["apsnr_before"] is not None and m["apsnr_after"] is not None
    assert [e["name"] for e in m["per_image"]] == names
    assert all(e["residual"] >= 0 for e in m["per_image"])
    # 3 epochs stay near the moment initialisation: nothing cropped, nothing to warn about framing;
    # but that initialisation ignores rotation and shear, which the self-consistency probe sees.
    assert m["framing_summary"]["content_kept_median"] > 0.85
    c = m["consistency_summary"]
    assert c["probe_sigma"] == 0.1 and c["probe_median_px"] > 0 and 0 < c["ratio"] < 1.5
    assert all(e["consistency_px"] >= 0 for e in m["per_image"])
    assert [w for w in m["warnings"] if "crops" in w or "shrinks" in w] == []
    assert c["object_sample"] == 24 and 0 <= c["object_ratio"] < 1.5  # at the objects, every image of 24
    assert any("not self-consistent" in w for w in m["warnings"]) == (c["object_ratio"] > 0.25)
    assert all(0 <= e["content_kept"] <= 1.5 and e["area_scale"] > 0 for e in m["per_image"])
    assert m["seconds"] > 0 and m["reference"] in names
    assert not any(p.name.startswith(".out.tmp") for p in out.parent.iterdir())


def test_written_transforms_reproduce_written_images(aligned_run, np_warp):
    d, out, _ = aligned_run
    t = json.loads((out / "transforms.json").read_text())
    assert "aligned-output" in t["convention"] or "aligned output" in t["convention"]
    for e in t["images"]:
        H = np.array(e["matrix"])
        assert H.shape == (3, 3)
        src = np.asarray(Image.open(d / e["name"]), dtype=np.float64)
        ref = np.asarray(Image.open(out / e["aligned_file"]), dtype=np.float64)
        mine = np_warp(src, H, t["output_size"], e["fill"])
        assert np.abs(np.clip(mine, 0, 255) - ref).max() <= 1.0 + 1e-6, e["name"]


def test_apply_aligns_new_images_with_the_trained_model(aligned_run, tmp_path):
    d, out, _ = aligned_run
    new = tmp_path / "new.zip"
    with zipfile.ZipFile(new, "w") as z:
        for p in sorted(d.iterdir())[:5]:
            z.write(p, arcname=f"batch/{p.name}")
    r = _run("apply", out / "model", new, "--out", tmp_path / "applied", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    t_new = json.loads((tmp_path / "applied" / "transforms.json").read_text())
    t_old = json.loads((out / "transforms.json").read_text())
    old = {e["name"]: np.array(e["matrix"]) for e in t_old["images"]}
    # The same images through the same trained aligner give the same warps as training's final pass.
    for e in t_new["images"]:
        assert e["name"].startswith("batch/")
        assert np.allclose(np.array(e["matrix"]), old[e["name"][6:]], atol=1e-4)
    assert not (tmp_path / "applied" / "model").exists()


@pytest.mark.parametrize("setup,args,msg", [
    (lambda p: None, ["align", "{p}/missing", "--out", "{p}/o"], "no such file"),
    (lambda p: (p / "e").mkdir(), ["align", "{p}/e", "--out", "{p}/o"], "no images found"),
    (lambda p: (p / "x.png").write_text("not an image"), ["align", "{p}/x.png", "--out", "{p}/o"], "not a readable image"),
    (lambda p: Image.fromarray(np.zeros((8, 8), np.uint8)).save(p / "one.png"),
     ["align", "{p}/one.png", "--out", "{p}/o"], "at least 2 images"),
    (lambda p: None, ["apply", "{p}", "{p}", "--out", "{p}/o"], "not a trained model"),
    (lambda p: None, ["apply", "{p}/nope", "{p}", "--out", "{p}/o"], "nope: no such folder"),
])
def test_errors_are_one_line_and_write_nothing(tmp_path, setup, args, msg):
    setup(tmp_path)
    r = _run(*[a.format(p=tmp_path) for a in args])
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert msg in lines[-1] and lines[-1].startswith("congeal ")
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_bad_flag_and_existing_output(tmp_path, aligned_run):
    d, out, _ = aligned_run
    r = _run("align", d, "--out", tmp_path / "o", "--warp", "spline")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = _run("align", d, "--out", out, "--epochs", "1")
    assert r.returncode == 2 and "not empty" in r.stderr
    r = _run("align", d, "--out", tmp_path / "o", "--reference", "nope.png", "--epochs", "1")
    assert r.returncode == 2 and "reference 'nope.png'" in r.stderr
    r = _run("align", d, "--out", tmp_path / "o", "--option", "learning_rate=1", "--epochs", "1")
    assert r.returncode == 2 and "unknown dprc option(s): learning_rate" in r.stderr
    r = _run("align", d, "--out", tmp_path / "o", "--option", "passes", "--epochs", "1")
    assert r.returncode == 2 and "expected KEY=VALUE" in r.stderr
    assert not (tmp_path / "o").exists()


def test_method_options_reach_the_method_and_its_saved_model(tmp_path, aligned_run):
    d, _, _ = aligned_run
    out = tmp_path / "o"
    r = _run("align", d, "--out", out, "--epochs", "1", "--device", "cpu",
             "--option", "passes=1", "--option", "stages=2", "--option", "init=centroid")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["passes"] == 1 and cfg["destnet"]["stages"] == 2 and cfg["init"] == "centroid"
    meta = json.loads((out / "metrics.json").read_text())
    assert meta["options"]["method_options"] == {"passes": 1, "stages": 2, "init": "centroid"}


def test_version_is_the_package_version_and_needs_no_torch():
    import tomllib
    from pathlib import Path

    import congeal

    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"congeal {congeal.__version__}"
    # pyproject.toml reads the version from congeal.__version__: one place to change it.
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert "version" in pyproject["project"]["dynamic"] and "version" not in pyproject["project"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "congeal.__version__"}
    code = "import sys\nfrom congeal.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n    pass\n" \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_help_lists_methods_and_warps_and_says_what_epochs_means():
    from models.geometry import WARP_FAMILIES
    from models.catalog import list_methods

    r = _run("align", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())  # argparse wraps lines
    assert f"one of {', '.join(list_methods())}" in text
    assert all(w in text for w in WARP_FAMILIES)
    assert "every image has been seen N times" in text and "outer iterations" in text
    r = _run("apply", "--help")
    text = " ".join(r.stdout.split())
    for arg in ("model_dir the model/ folder", "input a folder of images", "--out OUT output folder",
                "--device DEVICE torch device", "--aligned"):
        assert arg in text, arg
    r = _run("align", "x", "--out", "y", "--method", "nope")
    assert r.returncode == 2 and f"invalid choice: 'nope' (choose from {', '.join(map(repr, list_methods()))})" \
        in r.stderr


def test_a_non_empty_out_is_refused_before_any_image_is_read(tmp_path, aligned_run):
    d, out, _ = aligned_run
    t0 = time.monotonic()
    r = _run("align", d, "--out", out, "--epochs", "100000", "--device", "cpu")
    assert r.returncode == 2 and "not empty (use --overwrite)" in r.stderr
    assert "reading images" not in r.stderr and "training" not in r.stderr  # no progress of any stage
    assert time.monotonic() - t0 < 60  # 100,000 epochs would take hours
    r = _run("apply", out / "model", d, "--out", out, "--device", "cpu")
    assert r.returncode == 2 and "not empty" in r.stderr and "reading images" not in r.stderr


def test_apply_progress_counts_images(tmp_path, aligned_run):
    d, out, _ = aligned_run
    r = _run("apply", out / "model", d, "--out", tmp_path / "o", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "image/s" in r.stderr and "step/s" not in r.stderr  # tqdm's rate: images, not steps
    assert "24/24" in r.stderr
