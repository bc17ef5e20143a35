import numpy as np
import pytest
import torch
from PIL import Image

from models.data import mnist_digits
from models.perturb import make_pairs

# A small but real DPRC configuration for CPU tests: the paper's architecture
# family with fewer auto-encoder channels, so a fit takes seconds, not minutes.
FAST = {"batch_size": 32}


@pytest.fixture(scope="session")
def digits3():
    return mnist_digits(3, 60)


def bilinear_backward_warp(img: np.ndarray, H: np.ndarray, out_hw, fill) -> np.ndarray:
    """Independent NumPy reference for the published convention: out(p) = in(H p), bilinear,
    pixel centres at integers, outside -> fill. ``img`` (h, w) or (h, w, c) float."""
    h, w = img.shape[:2]
    im = img if img.ndim == 3 else img[..., None]
    Ho, Wo = out_hw
    ys, xs = np.mgrid[0:Ho, 0:Wo].astype(np.float64)
    q = np.stack([xs, ys, np.ones_like(xs)], -1) @ np.asarray(H, np.float64).T
    qx, qy = q[..., 0] / q[..., 2], q[..., 1] / q[..., 2]
    x0, y0 = np.floor(qx).astype(int), np.floor(qy).astype(int)
    ax, ay = (qx - x0)[..., None], (qy - y0)[..., None]
    fill = np.asarray(fill, np.float64).reshape(1, 1, -1)

    def at(yy, xx):
        ok = ((yy >= 0) & (yy < h) & (xx >= 0) & (xx < w))[..., None]
        v = im[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)].astype(np.float64)
        return np.where(ok, v, fill)

    out = ((1 - ax) * (1 - ay) * at(y0, x0) + ax * (1 - ay) * at(y0, x0 + 1)
           + (1 - ax) * ay * at(y0 + 1, x0) + ax * ay * at(y0 + 1, x0 + 1))
    return out if img.ndim == 3 else out[..., 0]


@pytest.fixture(scope="session")
def np_warp():
    """The independent NumPy backward warp, as a fixture (conftest is not importable here)."""
    return bilinear_backward_warp


@pytest.fixture
def tiny_folder(tmp_path):
    """24 perturbed MNIST '3's as PNGs, plus the sources and perturbations."""
    src = mnist_digits(3, 12)
    pairs = make_pairs(src, 0.08, seed=3)
    d = tmp_path / "in"
    d.mkdir()
    for i, im in enumerate(pairs.images):
        Image.fromarray((im[0].numpy() * 255 + 0.5).astype(np.uint8)).save(d / f"img_{i:02d}.png")
    return d, pairs


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def _untrained_model(folder, ref_radius: float):
    """A real (untrained) DPRC aligner for 28 px images: the moment initialisation alone."""
    import json

    from models.dprc import DPRCAligner
    from models.nets import PRESETS, DeSTNet, DeSTNetConfig

    net = DeSTNet(DeSTNetConfig(in_channels=1, image_size=(28, 28), warp="homography", bound=0.6,
                                **PRESETS["small"]["destnet"]))
    DPRCAligner(net, "moments", torch.zeros(2), torch.tensor(ref_radius)).save(folder)
    (folder / "pipeline.json").write_text(json.dumps({"working_size": [28, 28], "channels": 1,
                                                      "warp": "homography", "method": "dprc", "max_side": 28}))
    return folder


@pytest.fixture
def digits_npy(tmp_path):
    """18 perturbed MNIST '3's (9 sources x 2 copies) as one uint8 ``.npy``."""
    pairs = make_pairs(mnist_digits(3, 9), 0.1, seed=4)
    path = tmp_path / "d.npy"
    np.save(path, (pairs.images[:, 0].numpy() * 255).round().astype(np.uint8))
    return path


@pytest.fixture(scope="session")
def untrained_model():
    """``untrained_model(folder, ref_radius)``: a saved untrained DPRC model folder (apply without training)."""
    return _untrained_model
