"""The web page (``/ui``) end to end in a real browser: Debian's headless Chromium driven by
Playwright, against the API served by a real uvicorn: in embedded mode (open access), and once
on Redis with a Celery worker process and API keys. Jobs train for real, tiny (8 digits, 28 px).

Nothing is downloaded at test time: Playwright launches the system ``chromium``
(``.ci/run`` installs it). With ``CONGEAL_UI_SCREENSHOTS=<folder>`` set, each page is saved
there as a PNG (docs/ui/ was made so; see docs/web.md).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from service.app import create_app
from service.contracts import Settings
from service_testlib import KEYS, SAMPLES, png_bytes

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = os.environ.get("CONGEAL_UI_SCREENSHOTS")
TRAIN = SAMPLES[:8]  # 28x28 digits: a job of a few seconds on a CPU
NEW = SAMPLES[40:42]  # images the model has not seen


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The app under a real uvicorn on a thread: the browser talks HTTP to it like to any deployment."""

    def __init__(self, settings: Settings):
        import uvicorn

        self.settings = settings
        self.port = _port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def _settings(data_dir: Path, **kw) -> Settings:
    return Settings(redis_url=None, data_dir=data_dir, device="cpu", checkpoint_every_s=0, **kw)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        msg = "Debian's chromium is not installed (apt-get install chromium; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def open_server(tmp_path_factory):
    with Server(_settings(tmp_path_factory.mktemp("web-open"), allow_open=True)) as s:
        yield s


@pytest.fixture()
def page(browser):
    ctx = browser.new_context(viewport={"width": 1200, "height": 900}, accept_downloads=True)
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    # A refused request is logged by the browser as "Failed to load resource"; the tests expect some.
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error"
          and not m.text.startswith("Failed to load resource") else None)
    yield pg
    ctx.close()
    assert not errors, errors  # no script error, no CSP violation


def _shot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


def _get(server: Server, path: str, key: str | None = None):
    import httpx

    h = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.get(server.base + path, headers=h, timeout=30)
    r.raise_for_status()
    return r


def _all_images_loaded(page, selector: str) -> int:
    """How many <img> under ``selector`` show a decoded picture; waits for the fetches first."""
    page.wait_for_function(f"""() => [...document.querySelectorAll({json.dumps(selector)})]
        .every(i => i.complete && i.naturalWidth > 0)""", timeout=20_000)
    return page.eval_on_selector_all(selector, "els => els.length")


def _upload_job(page, server: Server, files, budget: str, shot: str | None = None, chosen: str | None = None) -> str:
    """Upload through the form: ``files`` is a list of paths (the file picker) or one folder (the
    folder picker); ``chosen``: what the page must say it is about to send."""
    page.goto(server.base + "/ui")
    page.wait_for_selector("#opt-method")
    if isinstance(files, Path):
        page.set_input_files("#pick-folder", files)
    else:
        page.set_input_files("#pick-files", [str(p) for p in files])
    if chosen is not None:
        assert page.text_content("#chosen") == chosen
    page.fill("#opt-budget", budget)
    page.fill("#opt-max_side", "28")
    page.select_option("#opt-warp", "similarity")
    if shot:
        _shot(page, shot)
    # Every text the progress line shows, as it shows it.
    page.evaluate("""() => { window.seen = []; new MutationObserver(() => {
        const p = document.querySelector('#job-progress-text'); if (p && p.textContent) window.seen.push(p.textContent);
      }).observe(document.querySelector('#view'), {subtree: true, childList: true, characterData: true}); }""")
    page.click("#submit")
    page.wait_for_url("**/ui#/job/*", timeout=30_000)
    return page.url.rsplit("/", 1)[1]


def test_upload_progress_results_gallery_downloads_and_inference(page, open_server, tmp_path):
    s = open_server
    page.goto(s.base + "/")  # the root sends a person to the page
    assert page.url.endswith("/ui")
    folder = tmp_path / "digits"
    (folder / "more").mkdir(parents=True)
    for i, p in enumerate(TRAIN):  # a folder with a subfolder, and files a folder brings along
        shutil.copy(p, folder / ("more" if i % 2 else "") / p.name)
    (folder / ".DS_Store").write_bytes(b"\0" * 10)
    (folder / "notes.txt").write_text("not an image")
    size = sum(p.stat().st_size for p in TRAIN) / 1024
    # 40 steps: the training stage must outlast the page's 1 s poll and the progress relay's throttle
    # on a fast idle CPU too (5 steps were missed between two polls on a CI machine).
    jid = _upload_job(page, s, folder, budget="40", shot="new_job",
                      chosen=f"8 file(s) chosen, {size:.1f} KiB; 2 other file(s) left out")
    if SHOTS:
        page.wait_for_selector("#job-progress-text:has-text('stage: training')", timeout=60_000)
        _shot(page, "job_running")
    page.wait_for_selector("#job-status.succeeded", timeout=120_000)
    seen = page.evaluate("window.seen")
    # The live line followed the job through its stages to the end, with training steps and the loss.
    assert any("stage: training" in t and "step " in t and "loss " in t for t in seen), seen
    assert page.text_content("#job-progress-text").startswith("stage: done"), seen
    assert page.is_hidden("#job-cancel")

    # Mean and variance before/after: four pictures, fetched by the page.
    assert _all_images_loaded(page, "#stats img") == 4
    summary = _get(s, f"/jobs/{jid}/summary").json()
    job = _get(s, f"/jobs/{jid}").json()
    apsnr = page.text_content("#apsnr")
    shown = re.fullmatch(r"APSNR ([\d.]+) dB before alignment, ([\d.]+) dB after \(8 images, method dprc, "
                         r"similarity warps\)\.", apsnr)
    assert shown, apsnr
    assert [float(x) for x in shown.groups()] == pytest.approx([summary["apsnr_before"], summary["apsnr_after"]],
                                                               abs=0.01)
    rows = page.eval_on_selector_all("#checks tbody tr", "trs => trs.map(r => [...r.cells].map(c => c.textContent))")
    assert rows == [[c["name"], c["value"], c["meaning"]] for c in summary["checks"]]
    warn = page.text_content("#warnings")
    if summary["warnings"]:
        assert all(w in warn for w in summary["warnings"])
    else:
        assert "No warnings" in warn

    # The gallery: every image (8 < a page), input beside aligned, largest residual first.
    page.wait_for_selector("#gallery .card")
    cards = page.eval_on_selector_all("#gallery .card", "cs => cs.map(c => [+c.dataset.residual, c.classList.contains('outlier')])")
    per = _get(s, f"/jobs/{jid}/per-image").json()["data"]
    want = sorted(per, key=lambda r: -r["residual"])
    assert [r for r, _ in cards] == pytest.approx([r["residual"] for r in want])
    assert [o for _, o in cards] == [bool(r["outlier"]) for r in want]
    assert _all_images_loaded(page, "#gallery img") == 2 * len(TRAIN)
    assert page.text_content("#gallery-range").startswith(f"Images 1–{len(TRAIN)} of {len(TRAIN)}")
    _shot(page, "job_result")

    # Downloads: the files themselves, as the API serves them.
    with page.expect_download() as d:
        page.click("text=aligned images (zip)")
    z = zipfile.ZipFile(d.value.path())
    assert sorted(n for n in z.namelist() if n.endswith(".png")) == sorted(p.name for p in TRAIN)
    assert "transforms.json" in z.namelist()
    with page.expect_download() as d:
        page.click("text=transforms (JSON)")
    assert json.loads(Path(d.value.path()).read_text()) == _get(s, job["links"]["transforms"]).json()
    with page.expect_download() as d:
        page.click("text=trained model (zip)")
    names = zipfile.ZipFile(d.value.path()).namelist()
    assert "model/pipeline.json" in names and any(n.endswith(".safetensors") for n in names), names

    # Inference on images the model has not seen, from the same page.
    page.set_input_files("#try-files", [str(p) for p in NEW])
    page.click("#try-form button[type=submit]")
    page.wait_for_selector("#try-results .card", timeout=60_000)
    assert _all_images_loaded(page, "#try-results img") == 2 * len(NEW)
    captions = page.eval_on_selector_all("#try-results figcaption", "fs => fs.map(f => f.textContent)")
    assert [c.split("matrix")[0] for c in captions] == [p.name for p in NEW]
    _shot(page, "inference")

    # The job list shows it.
    page.goto(s.base + "/ui#/jobs")
    page.wait_for_selector(f"#jobs-table a[href='#/job/{jid}']")
    assert "Jobs 1–" in page.text_content("#jobs-range")
    _shot(page, "job_list")


def test_the_job_list_pages(page, open_server):
    from service.contracts import JobKind, JobRecord, JobStatus, new_job_id, open_store

    store = open_store(open_server.settings)  # the server's own SQLite store: 25 more finished jobs
    try:
        for i in range(25):
            store.insert(JobRecord(id=new_job_id(), kind=JobKind.align, status=JobStatus.failed, n_inputs=i + 2,
                                   created_at=time.time() - 3600 - i, error="planted"))
    finally:
        store.close()
    total = _get(open_server, "/jobs").json()["total"]
    assert total >= 25 + 1
    page.goto(open_server.base + "/ui#/jobs")
    page.wait_for_selector("#jobs-table tbody tr")
    assert page.locator("#jobs-table tbody tr").count() == 20
    assert page.text_content("#jobs-range") == f"Jobs 1–20 of {total}, newest first."
    assert page.is_disabled("#jobs-prev") and page.is_enabled("#jobs-next")
    page.click("#jobs-next")
    page.wait_for_selector(f"#jobs-range:has-text('Jobs 21–{min(40, total)} of {total}')")
    ids = page.eval_on_selector_all("#jobs-table tbody a", "as => as.map(a => a.textContent)")
    want = [j["id"] for j in _get(open_server, "/jobs?offset=20&limit=20").json()["data"]]
    assert ids == want and page.url.endswith("#/jobs?offset=20")
    page.click("#jobs-prev")
    page.wait_for_selector("#jobs-range:has-text('Jobs 1–20')")


def test_a_running_job_is_cancelled_from_its_page(page, open_server):
    jid = _upload_job(page, open_server, TRAIN, budget="500")
    page.wait_for_selector("#job-cancel:visible", timeout=30_000)
    page.once("dialog", lambda d: d.accept())  # "Cancel this job?"
    page.click("#job-cancel")
    page.wait_for_selector("#job-status.cancelled", timeout=30_000)
    assert page.text_content("#job-error") == "This job was cancelled."
    assert page.is_hidden("#job-cancel") and page.is_hidden("#job-results")
    assert _get(open_server, f"/jobs/{jid}").json()["status"] == "cancelled"


def test_a_bad_upload_shows_the_services_error(page, open_server):
    s = open_server
    page.goto(s.base + "/ui")
    page.wait_for_selector("#opt-method")
    # Dropped on the page, as a person drags files from their desktop.
    good = list(SAMPLES[0].read_bytes())
    page.evaluate("""good => { const dt = new DataTransfer();
        dt.items.add(new File([new Uint8Array(good)], 'good.png', {type: 'image/png'}));
        dt.items.add(new File(['not a png'], 'broken.png', {type: 'image/png'}));
        document.querySelector('#drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true,
                                                                             cancelable: true})); }""", good)
    page.wait_for_selector("#chosen:has-text('2 file(s) chosen')")
    page.click("#submit")
    page.wait_for_selector("#new-error:not([hidden])")
    text = page.text_content("#new-error")
    assert "(422)" in text and "broken.png: not a readable image" in text, text
    assert page.url.endswith("/ui")  # no job: still on the form
    _shot(page, "bad_upload")

    # Without a mouse: Tab reaches the skip link first, then the file and folder pickers.
    page.goto(s.base + "/ui")
    page.wait_for_selector("#opt-method")
    order = []
    for _ in range(15):
        page.keyboard.press("Tab")
        order.append(page.evaluate("() => document.activeElement.id || document.activeElement.className"))
    assert order[0] == "skip" and order.index("pick-files") < order.index("pick-folder") < order.index("opt-method")


def test_pair_page_transfers_a_clicked_point(page, open_server, tmp_path):
    from models.pairwise import synthetic as S

    im = S.load_image("astronaut", short_side=200)
    im = im @ np.array([0.299, 0.587, 0.114], np.float32)
    p = S.homography_pair(im, np.random.default_rng(1), 96, 8.0, "astronaut")
    for name, a in (("src.png", p.source), ("tgt.png", p.target)):
        (tmp_path / name).write_bytes(png_bytes((np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)))
    s = open_server
    page.goto(s.base + "/ui#/pairs/new")
    page.wait_for_selector("#pair-method option[value=ecc]", state="attached")
    page.set_input_files("#pair-source", str(tmp_path / "src.png"))
    page.set_input_files("#pair-target", str(tmp_path / "tgt.png"))
    page.select_option("#pair-method", "ecc")
    page.click("#pair-form button[type=submit]")
    page.wait_for_url("**/ui#/pair/*")
    jid = page.url.rsplit("/", 1)[1]
    page.wait_for_selector("#pair-status.succeeded", timeout=120_000)
    _all_images_loaded(page, ".pair img")

    # Click the target at a known pixel; the page must show where the homography puts it.
    box = page.locator("#pick-target").bounding_box()
    th, tw = p.target.shape[:2]
    x, y = 30.0, 61.0  # target pixel (centres at integers)
    page.mouse.click(box["x"] + (x + 0.5) / tw * box["width"], box["y"] + (y + 0.5) / th * box["height"])
    page.wait_for_function("() => document.querySelector('#pair-point').dataset.x")
    shown = (float(page.get_attribute("#pair-point", "data-x")), float(page.get_attribute("#pair-point", "data-y")))
    H = np.array(_get(s, f"/pairs/{jid}").json()["pairs"][0]["matrix"])
    q = H @ np.array([x, y, 1.0])
    # The click lands within a CSS pixel of the aimed point: at 320 px for 96 px that is < 0.3 image px.
    assert shown == pytest.approx((q[0] / q[2], q[1] / q[2]), abs=0.5)
    truth = p.source_from_target @ np.array([x, y, 1.0])
    assert shown == pytest.approx((truth[0] / truth[2], truth[1] / truth[2]), abs=1.5)
    assert page.locator("#pick-source .marker.mapped").count() == 1
    _shot(page, "pair")

    # A job of two pairs (made through the API): the page shows the one chosen, with its own matrix.
    import httpx

    files = [("files", (n, (tmp_path / n).read_bytes(), "image/png")) for n in ("src.png", "tgt.png")]
    spec = json.dumps([["src.png", "tgt.png", "forward"], ["tgt.png", "src.png", "backward"]])
    r = httpx.post(s.base + "/pairs", files=files, data={"method": "ecc", "pairs": spec}, timeout=30)
    assert r.status_code == 202, r.text
    jid2 = r.json()["job"]["id"]
    page.goto(s.base + f"/ui#/pair/{jid2}")
    page.wait_for_selector("#pair-choose", timeout=120_000)
    page.select_option("#pair-choose", "1")
    page.wait_for_selector("#pair-summary:has-text('tgt.png → src.png')")
    _all_images_loaded(page, ".pair img")
    box = page.locator("#pick-target").bounding_box()  # the target of "backward" is src.png
    sh, sw = p.source.shape[:2]
    page.mouse.click(box["x"] + (x + 0.5) / sw * box["width"], box["y"] + (y + 0.5) / sh * box["height"])
    page.wait_for_function("() => document.querySelector('#pair-point').dataset.x")
    back = (float(page.get_attribute("#pair-point", "data-x")), float(page.get_attribute("#pair-point", "data-y")))
    H2 = np.array(_get(s, f"/pairs/{jid2}").json()["pairs"][1]["matrix"])
    q2 = H2 @ np.array([x, y, 1.0])
    assert back == pytest.approx((q2[0] / q2[2], q2[1] / q2[2]), abs=0.5)
    inv = np.linalg.inv(p.source_from_target) @ np.array([x, y, 1.0])  # and it is the inverse direction
    assert back == pytest.approx((inv[0] / inv[2], inv[1] / inv[2]), abs=1.5)
    assert page.locator(".marker").count() == 2  # the first pair's markers are gone


def test_the_page_works_with_api_keys_on_redis_and_a_celery_worker(browser, make_env, start_worker, tmp_path):
    """The same page on the other deployment: jobs in Redis, run by a Celery worker process, keys on."""
    env = make_env()
    start_worker(env, name=f"web-{env.tag}", wait=False)  # starts while the browser does its first steps
    with Server(env.settings()) as s:
        ctx = browser.new_context(viewport={"width": 1200, "height": 900}, accept_downloads=True)
        page = ctx.new_page()
        page.goto(s.base + "/ui#/jobs")
        page.wait_for_selector("#flash:not([hidden])")
        assert "401" in page.text_content("#flash") and "missing API key" in page.text_content("#flash")
        page.fill("#api-key", KEYS["alice"])
        page.click("#key-form button[type=submit]")
        page.wait_for_selector("#jobs-range:has-text('No jobs yet')")
        assert page.evaluate("sessionStorage.getItem('congeal.apiKey')") == KEYS["alice"]

        with zipfile.ZipFile(tmp_path / "three.zip", "w") as z:  # an archive this time
            for p in TRAIN[:3]:
                z.write(p, f"digits/{p.name}")
        jid = _upload_job(page, s, [tmp_path / "three.zip"], budget="1")
        page.wait_for_selector("#job-status.succeeded", timeout=120_000)
        # Pictures and downloads behind the key: fetched with it, shown and saved.
        assert _all_images_loaded(page, "#stats img") == 4
        page.wait_for_selector("#gallery .card")
        assert _all_images_loaded(page, "#gallery img") == 6
        with page.expect_download() as d:
            page.click("text=transforms (JSON)")
        got = json.loads(Path(d.value.path()).read_text())
        assert got == _get(s, f"/jobs/{jid}/transforms", KEYS["alice"]).json()

        # Another tenant's key sees no such job, and the page says so.
        page.fill("#api-key", KEYS["bob"])
        page.click("#key-form button[type=submit]")
        page.wait_for_selector("#flash:not([hidden])")
        assert f"404: no job with id '{jid}'" in page.text_content("#flash")
        ctx.close()


def test_the_page_and_its_files_are_served_with_a_strict_policy(open_server):
    s = open_server
    r = _get(s, "/ui")
    assert r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    for asset in ("static/ui/app.js", "static/ui/style.css"):
        assert asset in r.text
        assert _get(s, "/" + asset).status_code == 200
    assert "http" not in r.text.replace("http-equiv", "")  # nothing from another origin
    import httpx

    root = httpx.get(s.base + "/", follow_redirects=False)
    assert root.status_code == 307 and root.headers["location"] == "ui"  # relative: works under a prefix
