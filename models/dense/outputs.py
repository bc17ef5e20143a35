"""What a dense job leaves in its ``model/`` folder, and the figure of transferred points.
NumPy and Pillow only (the service reads these files and draws figures without torch).

``model/`` of a job run with method ``dense``::

    config.json  dense.safetensors   the trained net and atlas (models.catalog.load_aligner reads them)
    flows.npy    (N, H, W, 2) float32: canon_from_image maps, normalised canonical coordinates
    masks.npy    (N, H, W) float32: foreground (the atlas's alpha read at each map)
    images.npy   (N, H, W, 3) uint8: the working-size images the maps belong to
    atlas.png    the canonical atlas, RGBA (alpha: its foreground)
    transfer.png points spread over image 0's foreground and where they land in the others
    dense.json   sizes and the convention

Image indices are the job's index order (``names.txt``); pixels are working-size pixels.
"""
from __future__ import annotations

import colorsys
import json
from pathlib import Path

import numpy as np

from .transfer import transfer_points

__all__ = ["CONVENTION", "write_outputs", "points_figure", "spread_points", "load_outputs"]

CONVENTION = (
    "flows.npy[i, y, x] is the canonical-grid point (normalised: the grid's corner cell centres at -1 and +1, "
    "x then y) of pixel (x, y) of working-size image i (pixel centres at integers, origin at the top-left "
    "centre); a point moves from image a to image b to the pixel of b whose canonical point is nearest"
)


def _u8(a) -> np.ndarray:
    a = np.asarray(a)
    return a if a.dtype == np.uint8 else (np.clip(a, 0, 1) * 255).round().astype(np.uint8)


def spread_points(mask: np.ndarray, count: int = 12, seed: int = 0) -> np.ndarray:
    """Up to ``count`` pixel points spread over ``mask >= 0.5`` (farthest-point order), ``(K, 2)``."""
    ys, xs = np.nonzero(np.asarray(mask) >= 0.5)
    if len(xs) == 0:
        H, W = mask.shape
        ys, xs = np.mgrid[H // 4:3 * H // 4, W // 4:3 * W // 4].reshape(2, -1)
    pts = np.stack([xs, ys], 1).astype(np.float64)
    rng = np.random.default_rng(seed)
    chosen = [pts[rng.integers(len(pts))]]
    d = np.linalg.norm(pts - chosen[0], axis=1)
    while len(chosen) < min(count, len(pts)):
        chosen.append(pts[d.argmax()])
        d = np.minimum(d, np.linalg.norm(pts - chosen[-1], axis=1))
    return np.array(chosen)


def _colours(k: int) -> list[tuple[int, int, int]]:
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / max(1, k), 0.9, 1.0)) for i in range(k)]


def points_figure(images: np.ndarray, source: int, points: np.ndarray, targets: dict[int, np.ndarray],
                  scale: int = 3, columns: int = 6):
    """A contact sheet: image ``source`` with its ``points`` (``(K, 2)`` pixels), then each target
    image with the transferred points (same colour = same point). ``images``: ``(N, H, W, 3)``.
    Returns a ``PIL.Image``."""
    from PIL import Image, ImageDraw

    images = _u8(images)
    order = [source] + [b for b in targets if b != source]
    pts = {source: np.asarray(points, np.float64), **{b: np.asarray(p, np.float64) for b, p in targets.items()}}
    H, W = images.shape[1:3]
    cols = min(columns, len(order))
    rows = -(-len(order) // cols)
    pad = 4
    sheet = Image.new("RGB", (cols * (W * scale + pad) + pad, rows * (H * scale + pad) + pad), (30, 30, 30))
    cs = _colours(len(points))
    r = max(2, scale + 1)
    for n, i in enumerate(order):
        tile = Image.fromarray(images[i]).resize((W * scale, H * scale), Image.NEAREST)
        d = ImageDraw.Draw(tile)
        for k, (x, y) in enumerate(pts[i]):
            if not np.isfinite([x, y]).all():
                continue
            cx, cy = (x + 0.5) * scale, (y + 0.5) * scale
            shape = d.rectangle if i == source else d.ellipse
            shape([cx - r, cy - r, cx + r, cy + r], fill=cs[k], outline=(0, 0, 0))
        sheet.paste(tile, (pad + (n % cols) * (W * scale + pad), pad + (n // cols) * (H * scale + pad)))
    return sheet


def write_outputs(model_dir: Path, images, flows, masks, atlas, figure_images: int = 12) -> None:
    """Write the arrays, the atlas and the figure (layout in the module docstring). Tensors or arrays:
    ``images`` ``(N, 3, H, W)`` uint8, ``flows`` ``(N, H, W, 2)``, ``masks`` ``(N, H, W)``,
    ``atlas`` ``(4, A, A)`` (RGB in [0, 1], foreground logit)."""
    from PIL import Image

    def np_(t):
        return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)

    model_dir = Path(model_dir)
    ims = np.ascontiguousarray(np_(images).transpose(0, 2, 3, 1))
    fl = np_(flows).astype(np.float32)
    ms = np_(masks).astype(np.float32)
    at = np_(atlas).astype(np.float32)
    np.save(model_dir / "flows.npy", fl, allow_pickle=False)
    np.save(model_dir / "masks.npy", ms, allow_pickle=False)
    np.save(model_dir / "images.npy", _u8(ims), allow_pickle=False)
    rgba = np.concatenate([at[:3], 1 / (1 + np.exp(-at[3:4]))], 0).transpose(1, 2, 0)
    Image.fromarray(_u8(rgba), "RGBA").save(model_dir / "atlas.png")
    src_pts = spread_points(ms[0])
    targets = {b: transfer_points(fl, 0, b, src_pts, ms) for b in range(1, min(len(fl), figure_images))}
    points_figure(ims, 0, src_pts, targets).save(model_dir / "transfer.png")
    (model_dir / "dense.json").write_text(json.dumps({
        "n_images": int(fl.shape[0]), "size": [int(fl.shape[1]), int(fl.shape[2])],
        "atlas_size": [int(at.shape[1]), int(at.shape[2])], "convention": CONVENTION}, indent=1))


def load_outputs(model_dir: str | Path) -> dict:
    """The arrays a dense job wrote, memory-mapped: ``flows``, ``masks``, ``images``; ``FileNotFoundError``
    if the folder is not a dense job's."""
    model_dir = Path(model_dir)
    if not (model_dir / "flows.npy").is_file():
        raise FileNotFoundError(f"{model_dir}: no flows.npy (not a dense job's model folder)")
    out = {k: np.load(model_dir / f"{k}.npy", mmap_mode="r", allow_pickle=False) for k in ("flows", "masks")}
    img = model_dir / "images.npy"
    out["images"] = np.load(img, mmap_mode="r", allow_pickle=False) if img.is_file() else None
    return out
