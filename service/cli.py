"""``congeal serve`` and ``congeal demo`` (dispatched here by ``congeal.cli``)."""
from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from importlib import resources
from pathlib import Path

__all__ = ["run", "DEMO_BUDGET"]

DEMO_BUDGET = 3  # epochs: enough for a visible APSNR gain on the 48 samples, quick on a laptop CPU


def run(args) -> int:
    if args.cmd == "serve":
        return _serve(args)
    if args.cmd == "demo":
        return _demo(args)
    raise ValueError(f"unknown service command {args.cmd!r}")


def _settings(data_dir: str | None, **overrides):
    from .contracts import Settings

    s = Settings(**overrides)
    return s.model_copy(update={"data_dir": Path(data_dir)}) if data_dir else s


def _serve(args) -> int:
    import uvicorn
    from pydantic import ValidationError

    from .app import access_problem, create_app
    from .contracts.logs import configure_logging

    try:
        s = _settings(args.data_dir, **({"allow_open": True} if args.open else {}))
    except ValidationError as e:
        # One line per bad setting, named as the operator wrote it; never the value (it may be a key).
        bad = "; ".join(f"CONGEAL_{'_'.join(map(str, err['loc'])).upper()}: {err['msg']}" for err in e.errors())
        print(f"congeal serve: error: {bad}", file=sys.stderr)
        return 2
    problem = access_problem(s)
    if problem is not None:
        print(f"congeal serve: error: {problem}", file=sys.stderr)
        return 2
    configure_logging(s.log_level, s.log_format)
    mode = "embedded (no CONGEAL_REDIS_URL: jobs run in this process)" if s.embedded else f"Redis at {_redacted(s.redis_url)}"
    print(f"congeal API on http://{args.host}:{args.port} (web page at /ui, docs at /docs); {mode}; "
          f"artifacts in {Path(s.data_dir).resolve()}", file=sys.stderr)
    # Our handler for uvicorn's loggers too (log_config=None), and our request lines instead of its
    # access log: they carry the request id, the route and the duration.
    uvicorn.run(create_app(s), host=args.host, port=args.port, log_config=None, access_log=False)
    return 0


def _redacted(url: str) -> str:
    """A Redis URL without its password, for printing."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    return url if u.password is None else url.replace(f":{u.password}@", ":***@", 1)


def sample_images() -> list[Path]:
    root = resources.files("congeal") / "samples"
    return sorted(Path(str(p)) for p in root.iterdir() if p.name.endswith(".png"))


def _demo(args) -> int:
    """Embedded server in this process, the bundled sample aligned through real HTTP."""
    import uvicorn

    from .app import create_app
    from .client import ApiError, Client

    logging.basicConfig(level=logging.WARNING)
    # Embedded and open, whatever the environment says: the demo serves itself on 127.0.0.1 only.
    s = _settings(args.data_dir or "congeal-data", redis_url=None, api_keys=None, allow_open=True)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(s), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                print("congeal demo: the embedded server did not start", file=sys.stderr)
                return 1
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        c = Client(base)
        images = sample_images()
        print(f"embedded congeal API at {base}; uploading {len(images)} sample images "
              f"(perturbed MNIST 3s) to POST /jobs")
        job = c.upload("/jobs", images, {"budget": DEMO_BUDGET})
        print(f"job {job['id']} {job['status']}; following {job['links']['self']}")
        shown = {"line": None}

        def show(j: dict) -> None:
            p = j.get("progress") or {}
            parts = [j["status"], p.get("stage") or ""]
            if p.get("total"):
                parts.append(f"step {p['step']}/{p['total']}")
            if p.get("loss") is not None:
                parts.append(f"loss {p['loss']:.4f}")
            if p.get("apsnr") is not None:
                parts.append(f"APSNR {p['apsnr']:.2f} dB")
            line = "  " + ", ".join(x for x in parts if x)
            if line != shown["line"]:
                print(line, flush=True)
                shown["line"] = line

        job = c.wait(job["id"], show, timeout=900)
        if job["status"] != "succeeded":
            print(f"congeal demo: job {job['status']}: {job.get('error')}", file=sys.stderr)
            return 1
        out = Path(s.data_dir).resolve() / "demo-results" / job["id"]
        links = job["links"]
        got = [c.download(links["transforms"], out / "transforms.json"),
               c.download(links["aligned_zip"], out / "aligned.zip"),
               c.download(links["mean_before"], out / "mean_before.png"),
               c.download(links["mean_after"], out / "mean_after.png"),
               c.download(links["metrics"], out / "metrics.json"),
               c.download(links["report"], out / "report.html")]
        m = job["metrics"]
        print(f"aligned {m['n_images']} images: APSNR {m['apsnr_before']:.2f} dB -> {m['apsnr_after']:.2f} dB")
        print(f"downloaded over HTTP to {out}: " + ", ".join(p.name for p in got))
        print(f"open {out / 'report.html'} in a browser to look at the result")
        print(f"the job's artifacts (aligned/, model/, ...) are in {Path(s.data_dir).resolve() / 'jobs' / job['id']}")
        return 0
    except ApiError as e:
        print(f"congeal demo: {e}", file=sys.stderr)
        return 1
    finally:
        server.should_exit = True
        thread.join(timeout=60)
