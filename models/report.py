"""``report.html``: one job's result as a page a person can look at, self-contained and offline.

Written by :mod:`models.pipeline` beside the other outputs (so by ``congeal align``, ``congeal
apply`` and the service's jobs alike): what was run, the checks and warnings in words, the mean
and variance images before and after, the training curve, and a contact sheet of inputs beside
their aligned images, worst residual first. Every image is inlined as a base64 PNG and the
curves are inline SVG; the page loads nothing, runs no script, and its Content-Security-Policy
forbids both, so it opens the same from a laptop, a shared folder or the API.

Its cost does not grow with the job: the contact sheet shows a bounded sample (the worst
residuals, then an even spread over the rest), drawn by the caller from the images it already
holds; everything else comes from ``metrics.json``'s summaries and the four statistics images.

NumPy and Pillow only, never torch: the service's web page can call the pieces
(:func:`sample_indices`, :func:`png_data_uri`, :func:`checks`, :func:`curve_svg`,
:func:`gallery_html`, :func:`statistics_html`, :func:`warnings_html`) without loading the core.
"""
from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "REPORT_FILE",
    "STAT_IMAGES",
    "CSP",
    "Sample",
    "Check",
    "sample_indices",
    "png_data_uri",
    "checks",
    "checks_html",
    "warnings_html",
    "statistics_html",
    "curve_svg",
    "gallery_html",
    "render_report",
    "write_report",
]

REPORT_FILE = "report.html"
STAT_IMAGES = ("mean_before", "mean_after", "var_before", "var_after")
# The contact sheet: this many of the worst residuals, then this many spread over the rest.
WORST, SPREAD = 24, 24


@dataclass
class Sample:
    """The images a contact sheet shows, in the order it shows them (worst residual first).

    ``inputs`` and ``aligned``: uint8 ``(k, H, W)`` or ``(k, H, W, 3)``, at the working size.
    The per-image fields are 1-D of length ``k``; ``cropped`` (bool) marks the images whose
    aligned frame keeps less of the object than the product's target; ``touches_edge`` is None
    where the border check was off.
    """

    index: np.ndarray  # position in the collection
    names: list[str]
    inputs: np.ndarray
    aligned: np.ndarray
    residual: np.ndarray
    outlier: np.ndarray
    content_kept: np.ndarray | None = None
    cropped: np.ndarray | None = None
    touches_edge: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class Check:
    """One measure of the job, its value in words and what it means."""

    name: str
    value: str
    meaning: str


def sample_indices(residual: np.ndarray, worst: int = WORST, spread: int = SPREAD) -> np.ndarray:
    """Which images a contact sheet shows: the ``worst`` largest residuals, then ``spread`` more
    at even steps through the rest by rank (down to the smallest), all in decreasing residual.
    Every image when there are at most ``worst + spread``. Non-finite residuals count as worst."""
    r = np.nan_to_num(np.asarray(residual, dtype=np.float64), nan=np.inf)
    order = np.argsort(-r, kind="stable")  # (N,) largest first
    if len(order) <= worst + spread:
        return order
    rest = order[worst:]
    picks = np.unique(np.linspace(0, len(rest) - 1, spread).round().astype(np.int64))
    return np.concatenate([order[:worst], rest[picks]])


def png_data_uri(image: np.ndarray | bytes) -> str:
    """``data:image/png;base64,...`` of PNG bytes, or of a uint8 ``(H, W)`` / ``(H, W, 3)`` array."""
    if not isinstance(image, (bytes, bytearray)):
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
        image = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(image).decode("ascii")


def _esc(v) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


# --------------------------------------------------------------------------- the pieces


def checks(metrics: dict) -> list[Check]:
    """The job's measures from ``metrics.json``, each with what it means, in words."""
    n = metrics.get("n_images") or 0
    out = [Check("images", _fmt(n), f"aligned with method {metrics.get('method')} and "
                                    f"{metrics.get('warp')} warps on {metrics.get('device', 'n/a')}")]
    b, a = metrics.get("apsnr_before"), metrics.get("apsnr_after")
    out.append(Check("APSNR", f"{_fmt(b)} dB before, {_fmt(a)} dB after",
                     "how alike the images are, pixel by pixel (higher: more alike); it also rises when "
                     "the objects shrink or leave the frame, so read it with the framing below"))
    r = metrics.get("residual_summary") or {}
    if r:
        out.append(Check("residual", f"median {_fmt(r.get('median'))}, 95th percentile {_fmt(r.get('p95'))}, "
                                     f"max {_fmt(r.get('max'))}",
                         "each aligned image's mean absolute difference from the aligned mean (0-255); "
                         f"{_fmt(r.get('n_outliers', 0))} of {_fmt(n)} images stand out from the rest "
                         "(outliers), shown first in the contact sheet"))
    f = metrics.get("framing_summary") or {}
    if f.get("content_kept_median") is not None:
        out.append(Check("content kept", f"median {_fmt(f['content_kept_median'])}, "
                                         f"10th percentile {_fmt(f.get('content_kept_p10'))}",
                         "the share of each image's object that its aligned frame still shows (1: all of it); "
                         f"{_fmt(f.get('n_cropped', 0))} images keep less than the target"
                         + ("" if f.get("n_lost") is None else
                            f", {_fmt(f['n_lost'])} lost their object (less than half kept, or shown at "
                            "more than 6 times or less than 1/6 of its area)")))
    if f.get("area_scale_median") is not None:
        out.append(Check("object size", f"median {_fmt(f['area_scale_median'])}",
                         "each input's area per aligned pixel at the frame's centre: above 1 the aligned "
                         "frame shows the object smaller than its input did, below 1 larger"))
    if f.get("n_touching_edge") is not None:
        out.append(Check("border contact", f"{_fmt(f['n_touching_edge'])} of {_fmt(n)} images",
                         "images whose object reaches the image border and may be cut by it"))
    c = metrics.get("consistency_summary")
    if c:
        at_object = "ratio " if c.get("object_ratio") is None else \
            f"ratio {_fmt(c['object_ratio'])} at the objects ({_fmt(c.get('object_sample'))} images), "
        out.append(Check("self-consistency", f"{at_object}{_fmt(c.get('ratio'))} at the frames' corners "
                                             f"(they moved {_fmt(c.get('moved_median_px'))} px for a "
                                             f"{_fmt(c.get('probe_median_px'))} px probe)",
                         "each image re-warped by a known random perturbation and aligned again: 0 means "
                         "the aligner undoes it exactly, 1 that it ignores the image; the corners lie "
                         "farther from the object as the frame grows"))
    if metrics.get("seconds") is not None:
        out.append(Check("time", f"{_fmt(float(metrics['seconds']))} s", "the whole job, from reading the images "
                                                                        "to writing the outputs"))
    return out


def checks_html(metrics: dict) -> str:
    rows = "".join(f"<tr><th>{_esc(c.name)}</th><td>{_esc(c.value)}</td><td>{_esc(c.meaning)}</td></tr>"
                   for c in checks(metrics))
    return f'<table class="checks"><tbody>{rows}</tbody></table>'


def warnings_html(metrics: dict) -> str:
    """The job's warnings as sentences; says so plainly when there are none."""
    ws = metrics.get("warnings") or []
    if not ws:
        return '<p class="ok">No warnings: the framing and consistency checks are within their limits.</p>'
    return '<ul class="warnings">' + "".join(f"<li>{_esc(w)}</li>" for w in ws) + "</ul>"


def statistics_html(images: dict[str, bytes], width: int = 192) -> str:
    """The mean and variance images before and after, side by side (PNG bytes by
    :data:`STAT_IMAGES` name; missing ones are left out), each shown ``width`` px wide."""
    cells = []
    for name in STAT_IMAGES:
        if name in images:
            what, when = name.split("_")
            cells.append(f'<figure><img class="px" src="{png_data_uri(images[name])}" alt="{_esc(name)}" '
                         f'width="{int(width)}"><figcaption>{_esc(what)}, {_esc(when)} '
                         f'alignment</figcaption></figure>')
    return '<div class="stats">' + "".join(cells) + "</div>"


def curve_svg(history: list[dict], keys: tuple[str, ...] = ("loss", "D", "C", "apsnr"),
              width: int = 340, height: int = 170) -> str:
    """Inline SVG of the training history: one panel per key present in the rows, against
    ``step``. A step lower than the one before starts a new line (a re-fit trains again)."""
    panels = []
    for key in keys:
        pts = [(float(r["step"]), float(r[key])) for r in history
               if isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), (int, float))
               and math.isfinite(float(r[key]))]
        if len(pts) < 2:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, x1 = min(xs), max(xs)
        y0, y1 = min(ys), max(ys)
        if y1 == y0:
            y0, y1 = y0 - 1, y1 + 1
        ml, mr, mt, mb = 48, 10, 10, 24

        def px(x, y):
            return (ml + (x - x0) / max(x1 - x0, 1e-12) * (width - ml - mr),
                    mt + (y1 - y) / (y1 - y0) * (height - mt - mb))

        lines, cur, last = [], [], None
        for x, y in pts:
            if last is not None and x < last:
                lines.append(cur)
                cur = []
            cur.append(px(x, y))
            last = x
        lines.append(cur)
        polys = "".join('<polyline fill="none" stroke="#1f5fa8" stroke-width="1.5" points="'
                        + " ".join(f"{a:.1f},{b:.1f}" for a, b in line) + '"/>' for line in lines if line)
        axis = (f'<line x1="{ml}" y1="{height - mb}" x2="{width - mr}" y2="{height - mb}" stroke="#888"/>'
                f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{height - mb}" stroke="#888"/>'
                f'<text x="{ml - 4}" y="{mt + 10}" text-anchor="end">{_esc(_fmt(y1))}</text>'
                f'<text x="{ml - 4}" y="{height - mb}" text-anchor="end">{_esc(_fmt(y0))}</text>'
                f'<text x="{ml}" y="{height - 6}">step {_esc(_fmt(int(x0)))}</text>'
                f'<text x="{width - mr}" y="{height - 6}" text-anchor="end">step {_esc(_fmt(int(x1)))}</text>')
        panels.append(f'<figure><svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" '
                      f'height="{height}" viewBox="0 0 {width} {height}" class="curve" data-key="{_esc(key)}">'
                      f'<title>{_esc(key)} by training step</title>{axis}{polys}</svg>'
                      f'<figcaption>{_esc(key)}</figcaption></figure>')
    if not panels:
        return '<p>No training history (this job applied a trained model, or its method records none).</p>'
    return '<div class="curves">' + "".join(panels) + "</div>"


def gallery_html(sample: Sample, size: int = 84) -> str:
    """The contact sheet: each sampled input beside its aligned image, in the sample's order,
    with its name, residual and flags. Images are shown ``size`` px on their longer side."""
    if sample is None or len(sample) == 0:
        return "<p>No images to show.</p>"
    h, w = sample.inputs.shape[1:3]
    dw, dh = (size, max(1, round(size * h / w))) if w >= h else (max(1, round(size * w / h)), size)
    cards = []
    for k in range(len(sample)):
        flags = []
        if bool(sample.outlier[k]):
            flags.append("outlier")
        if sample.cropped is not None and bool(sample.cropped[k]):
            flags.append(f"cropped: keeps {float(sample.content_kept[k]):.2f} of its object")
        if sample.touches_edge is not None and int(sample.touches_edge[k]) == 1:
            flags.append("touches border")
        name = sample.names[k]
        short = name if len(name) <= 28 else "\u2026" + name[-27:]
        imgs = "".join(f'<img class="px" src="{png_data_uri(a)}" width="{dw}" height="{dh}" alt="{_esc(t)}">'
                       for a, t in ((sample.inputs[k], "input"), (sample.aligned[k], "aligned")))
        cards.append(f'<figure class="card" data-index="{int(sample.index[k])}" '
                     f'data-residual="{float(sample.residual[k]):.6g}">{imgs}'
                     f'<figcaption><span title="{_esc(name)}">{_esc(short)}</span><br>'
                     f'residual {_esc(_fmt(float(sample.residual[k])))}'
                     + (f"<br><em>{_esc(', '.join(flags))}</em>" if flags else "")
                     + "</figcaption></figure>")
    return '<div class="sheet">' + "".join(cards) + "</div>"


# --------------------------------------------------------------------------- the page

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd}
table.checks{border-collapse:collapse}table.checks th,table.checks td{text-align:left;vertical-align:top;
padding:.3em .8em .3em 0;border-bottom:1px solid #eee}table.checks td:last-child{color:#555}
ul.warnings li{color:#8a1f11;margin:.4em 0}p.ok{color:#1d6b2b}
img.px{image-rendering:pixelated;background:#000}
.stats,.sheet,.curves{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0}figcaption{font-size:12px;color:#555;text-align:center}
.card{border:1px solid #ddd;padding:4px;width:180px}.card img{margin:1px}.card figcaption{text-align:left}
svg.curve text{font-size:11px;fill:#555}
"""
# What the page may load: images from data URIs and its own inline style; nothing else, no script.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def render_report(metrics: dict, images: dict[str, bytes], sample: Sample | None) -> str:
    """The whole page as a string (see the module docstring for what it holds)."""
    title = f"congeal: {metrics.get('method', '?')} on {_fmt(metrics.get('n_images') or 0)} images"
    notes = metrics.get("notes") or []
    n = metrics.get("n_images") or 0
    shown = 0 if sample is None else len(sample)
    sheet_note = (f"All {_fmt(n)} images, largest residual first." if shown >= n else
                  f"{_fmt(shown)} of {_fmt(n)} images: the {min(WORST, shown)} largest residuals, then an "
                  "even spread over the rest down to the smallest.")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        '<section id="checks"><h2>Checks</h2>', checks_html(metrics), "</section>",
        '<section id="warnings"><h2>Warnings</h2>', warnings_html(metrics), "</section>",
    ]
    if notes:
        parts += ['<section id="notes"><h2>Notes</h2><ul>', "".join(f"<li>{_esc(x)}</li>" for x in notes),
                  "</ul></section>"]
    parts += [
        '<section id="statistics"><h2>Mean and variance, before and after</h2>',
        "<p>Pixel-wise mean and variance of the collection before alignment (the inputs at the working "
        "size) and after; a sharp mean and a dark variance after alignment mean the images agree. Both "
        "variance images share one scale.</p>",
        statistics_html(images), "</section>",
        '<section id="training"><h2>Training</h2>', curve_svg(metrics.get("history") or []), "</section>",
        '<section id="sheet"><h2>Inputs and aligned images, by residual</h2>',
        f"<p>{_esc(sheet_note)} Each pair: the input (at the working size) and its aligned image.</p>",
        gallery_html(sample), "</section>",
        "</body></html>",
    ]
    return "\n".join(parts)


def write_report(out_dir: str | Path, metrics: dict, sample: Sample | None) -> Path:
    """Write ``out_dir/report.html`` from ``metrics`` (as written to ``metrics.json``), the
    statistics PNGs already in ``out_dir``, and the contact-sheet sample."""
    out_dir = Path(out_dir)
    images = {n: (out_dir / f"{n}.png").read_bytes() for n in STAT_IMAGES if (out_dir / f"{n}.png").is_file()}
    path = out_dir / REPORT_FILE
    path.write_text(render_report(metrics, images, sample), encoding="utf-8")
    return path
