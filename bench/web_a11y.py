"""Is the web page (/ui) accessible, and how fast does each view appear? axe-core in Chromium.

Serves the API in embedded mode (open access) under uvicorn on a free local port, runs one small
alignment job and one pair job through the API, then opens each view of the page in Debian's
headless ``chromium`` (Playwright, launched by path) and runs axe-core's WCAG 2.0/2.1 A and AA
rules on it. axe-core is not a dependency of the project: install it from npm where you like
(``npm install axe-core@4.14.1``) and pass its ``axe.min.js``. The page's CSP forbids the inline
script that injects axe, so the browser context bypasses CSP for this audit only.

    PYTHONPATH=. python bench/web_a11y.py --axe /tmp/web-axe/node_modules/axe-core/axe.min.js \\
        --out bench/results/web/a11y.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VIEWS = [("new job", "#/new", "#opt-method"), ("job", "#/job/{job}", "#gallery .card"),
         ("job list", "#/jobs", "#jobs-table tbody tr"), ("new pair", "#/pairs/new", "#pair-method option"),
         ("pair", "#/pair/{pair}", "#pair-result:not([hidden])")]


def _serve(data_dir: str):
    import uvicorn

    from service.app import create_app
    from service.contracts import Settings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = Settings(redis_url=None, allow_open=True, data_dir=data_dir, device="cpu")
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


def _jobs(base: str) -> dict:
    import httpx
    import numpy as np
    from PIL import Image
    import io

    samples = sorted((Path(__file__).resolve().parents[1] / "congeal" / "samples").glob("*.png"))[:8]
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in samples]
    job = httpx.post(base + "/jobs", files=files, data={"budget": "2", "max_side": "28"}, timeout=60).json()["id"]
    rng = np.random.default_rng(0)
    img = (rng.random((64, 64)) * 255).astype(np.uint8)

    def png(a):
        b = io.BytesIO()
        Image.fromarray(a).save(b, format="PNG")
        return b.getvalue()

    pf = [("files", ("s.png", png(img), "image/png")), ("files", ("t.png", png(np.roll(img, 3, axis=1)), "image/png"))]
    pair = httpx.post(base + "/pairs", files=pf, data={"method": "ecc"}, timeout=60).json()["job"]["id"]
    for jid in (job, pair):
        while httpx.get(f"{base}/jobs/{jid}", timeout=30).json()["status"] not in ("succeeded", "failed", "cancelled"):
            time.sleep(0.5)
    return {"job": job, "pair": pair}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--axe", required=True, help="path of axe-core's axe.min.js")
    ap.add_argument("--out", help="write the results here (JSON)")
    args = ap.parse_args()
    axe = Path(args.axe).read_text()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    tmp = tempfile.TemporaryDirectory(prefix="congeal-a11y-")
    server, base = _serve(tmp.name)
    ids = _jobs(base)
    results = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        ctx = browser.new_context(bypass_csp=True, viewport={"width": 1200, "height": 900})
        page = ctx.new_page()
        for name, frag, ready in VIEWS:
            t0 = time.perf_counter()
            page.goto(f"{base}/ui{frag.format(**ids)}")
            page.wait_for_selector(ready, state="attached")
            shown_s = time.perf_counter() - t0
            page.wait_for_load_state("networkidle")
            page.add_script_tag(content=axe)
            res = page.evaluate("""() => axe.run(document, {runOnly: {type: 'tag',
                values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa']}})""")
            violations = [{"id": v["id"], "impact": v["impact"], "help": v["help"], "nodes": len(v["nodes"]),
                           "targets": [n["target"] for n in v["nodes"]][:5]} for v in res["violations"]]
            row = {"view": name, "fragment": frag, "shown_s": round(shown_s, 3), "passes": len(res["passes"]),
                   "violations": violations, "incomplete": [v["id"] for v in res["incomplete"]]}
            results.append(row)
            print(json.dumps(row))
        browser.close()
    server.should_exit = True
    time.sleep(1)  # let the server's lifespan close the store before its folder goes
    tmp.cleanup()
    out = {"axe_core": json.loads(Path(args.axe).with_name("package.json").read_text())["version"]
           if Path(args.axe).with_name("package.json").is_file() else None,
           "chromium": chromium, "views": results}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 1 if any(r["violations"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
