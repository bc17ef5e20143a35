"""Peak RSS of the API process under a hostile-upload corpus (issue 21), case by case.

    python bench/hostile_rss.py --redis-url redis://127.0.0.1:6379/12 [--tree PATH] [--concurrent 6] [--out F]

Starts ``uvicorn service.app:app`` from ``--tree`` (default: this checkout; give an older
checkout to measure before a change) on a free port of 127.0.0.1 with the default limits (rate
and in-flight limits off, two generated API keys), lets it settle, then sends each case of the
corpus one after another. Before each case the kernel's peak-RSS mark of the server is reset
(``/proc/PID/clear_refs``, Linux); after it, ``VmHWM - VmRSS before`` is the most the case made
the process hold. Prints JSON: per case the status, the start of the answer, the peak above the
process's RSS before the case (MiB) and the seconds. No worker consumes the run's queue; its keys
are deleted afterwards. Nothing listens on or connects to anything but 127.0.0.1.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import secrets
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
import zipfile
import zlib
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted((ROOT / "congeal" / "samples").glob("*.png"))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def flat_png(w: int, h: int, colour_type: int, bit_depth: int = 8) -> bytes:
    """A valid, all-zero PNG compressed row by row (6: RGBA, 0: grey)."""
    channels = {0: 1, 2: 3, 6: 4}[colour_type]
    row = b"\0" * (1 + channels * w * bit_depth // 8)
    z, parts = zlib.compressobj(9), []
    for _ in range(h):
        parts.append(z.compress(row))
    parts.append(z.flush())
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0))
            + _png_chunk(b"IDAT", b"".join(parts)) + _png_chunk(b"IEND", b""))


def png_header(w: int, h: int) -> bytes:
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))


def flat_jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 90, 90)).save(buf, format="JPEG", quality=50)
    return buf.getvalue()


def tar_bytes(mode: str, members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zip_bytes(members, compression=zipfile.ZIP_DEFLATED) -> bytes:
    import warnings

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, data in members:
            z.writestr(name, data)
    return buf.getvalue()


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def corpus() -> list[tuple[str, list[tuple[str, bytes]] | str]]:
    good = SAMPLES[0].read_bytes()
    rgba = flat_png(6300, 6300, 6)  # 39.7 MP
    npz = io.BytesIO()
    np.savez(npz, a=np.zeros((3, 28, 28), "u1"))
    return [
        ("2 x 39.7 MP RGBA PNG (170 KB each)", [("a.png", rgba), ("b.png", rgba)]),
        ("2 x 39.7 MP 16-bit grey PNG", [("a.png", flat_png(6300, 6300, 0, 16)), ("b.png", flat_png(6300, 6300, 0, 16))]),
        ("2 x 39.7 MP RGB JPEG", [("a.jpg", flat_jpeg(6300, 6300)), ("b.jpg", flat_jpeg(6300, 6300))]),
        ("100,000 x 100,000 PNG header", [("a.png", good), ("huge.png", png_header(100_000, 100_000))]),
        ("zip bomb (25 MB of zeros deflated)", [("bomb.zip", zip_bytes([("a.png", good), ("bomb.png", b"\0" * 25_000_000)]))]),
        ("tar.gz bomb (200 MB member in ~200 KB)",
         [("bomb.tar.gz", tar_bytes("w:gz", [("a.png", good), ("bomb.png", b"\0" * 200_000_000), ("b.png", good)]))]),
        ("tar.xz bomb (200 MB member)",
         [("bomb.tar.xz", tar_bytes("w:xz", [("a.png", good), ("bomb.png", b"\0" * 200_000_000), ("b.png", good)]))]),
        ("zip of 2 x 39.7 MP RGBA PNG", [("big.zip", zip_bytes([("a.png", rgba), ("b.png", rgba)], zipfile.ZIP_STORED))]),
        (".npz named .npy", [("arr.npy", npz.getvalue())]),
        ("200 MB float64 .npy (400 x 256 x 256)", [("big.npy", npy_bytes(np.full((400, 256, 256), 0.5)))]),
        ("duplicate member names in a zip", [("d.zip", zip_bytes([("a/b.png", good), ("a\\b.png", good)]))]),
        ("truncated PNG", [("a.png", good), ("b.png", good[: len(good) // 2])]),
        ("3,000 unknown 60 KB form fields (180 MB)", "fields"),
    ]


def _status(pid: int) -> dict[str, float]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) / 1024
    return out


def _reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _fields_request(base: str, key: str) -> tuple[int, str]:
    """3,000 unknown 60 KB fields, chunked (no Content-Length to refuse up front)."""
    host, port = base.removeprefix("http://").split(":")
    b = "bench-boundary"
    head = (f"POST /jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n"
            f"Content-Type: multipart/form-data; boundary={b}\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    got = b""
    with socket.create_connection((host, int(port)), timeout=120) as s:
        s.sendall(head)
        try:
            for i in range(3000):
                part = (f"--{b}\r\nContent-Disposition: form-data; name=\"junk{i}\"\r\n\r\n").encode() \
                    + b"x" * 60_000 + b"\r\n"
                s.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            end = f"--{b}--\r\n".encode()
            s.sendall(f"{len(end):x}\r\n".encode() + end + b"\r\n0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed before the body ended: what is wanted
        while True:
            try:
                part = s.recv(65536)
            except OSError:
                break
            if not part:
                break
            got += part
    status = int(got.split(b" ", 2)[1]) if got.startswith(b"HTTP/") else 0
    return status, got.split(b"\r\n\r\n", 1)[-1][:160].decode(errors="replace")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose service to run")
    ap.add_argument("--concurrent", type=int, default=6, help="uploads of the 39.7 MP pair sent at once at the end")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    keys = {"alice": secrets.token_hex(16), "bob": secrets.token_hex(16)}
    tag = secrets.token_hex(4)
    cases = corpus()
    with tempfile.TemporaryDirectory(prefix="congeal-rss-") as data, \
            tempfile.TemporaryFile(mode="w+") as log:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONGEAL_")}
        env.update(PYTHONPATH=str(a.tree), CONGEAL_DATA_DIR=data, CONGEAL_REDIS_URL=a.redis_url,
                   CONGEAL_KEY_PREFIX=f"congeal-rss-{tag}", CONGEAL_QUEUE=f"congeal-rss-{tag}",
                   CONGEAL_API_KEYS=",".join(f"{t}:{hashlib.sha256(k.encode()).hexdigest()}" for t, k in keys.items()),
                   CONGEAL_MAX_JOBS_IN_FLIGHT_PER_KEY="1000000", CONGEAL_RATE_LIMIT_PER_MINUTE="0")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1",
                                 "--port", str(port), "--log-level", "warning", "--no-access-log"],
                                cwd=str(a.tree), env=env, stdout=subprocess.DEVNULL, stderr=log)
        rows = []
        try:
            for _ in range(300):
                try:
                    urllib.request.urlopen(f"{base}/healthz", timeout=2)
                    break
                except OSError:
                    time.sleep(0.2)
            h = {"Authorization": f"Bearer {keys['alice']}"}
            with httpx.Client(base_url=base, timeout=600) as c:  # warm up: imports, first upload
                c.post("/jobs", headers=h, files=[("files", (p.name, p.read_bytes(), "image/png")) for p in SAMPLES[:2]])
            time.sleep(1)
            idle = _status(proc.pid)["VmRSS"]

            def send(files, tenant="alice"):
                with httpx.Client(base_url=base, timeout=600) as c:
                    r = c.post("/jobs", headers={"Authorization": f"Bearer {keys[tenant]}"},
                               files=[("files", (n, d, "application/octet-stream")) for n, d in files])
                    return r.status_code, r.text[:160]

            for name, files in cases + [(f"{a.concurrent} uploads of the 39.7 MP RGBA pair at once (two keys)",
                                         "concurrent")]:
                before = _status(proc.pid)["VmRSS"]
                _reset_peak(proc.pid)
                t0 = time.monotonic()
                if files == "fields":
                    status, text = _fields_request(base, keys["alice"])
                elif files == "concurrent":
                    out: list = []
                    pair = cases[0][1]
                    ts = [threading.Thread(target=lambda t=t: out.append(send(pair, t)))
                          for t in (["alice", "bob"] * a.concurrent)[: a.concurrent]]
                    for t in ts:
                        t.start()
                    for t in ts:
                        t.join()
                    status, text = sorted({s for s, _ in out}), out[0][1] if out else ""
                else:
                    status, text = send(files)
                took = time.monotonic() - t0
                st = _status(proc.pid)
                rows.append({"case": name, "status": status, "answer": text, "seconds": round(took, 2),
                             "peak_above_before_mib": round(st["VmHWM"] - before, 1)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            final = _status(proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            import redis

            r = redis.Redis.from_url(a.redis_url)
            ks = list(r.scan_iter(match=f"congeal-rss-{tag}*", count=1000))
            if ks:
                r.delete(*ks)
            log.seek(0)
            tracebacks = log.read().count("Traceback")
    result = {"tree": str(a.tree), "idle_rss_mib": round(idle, 1), "rss_after_mib": round(final["VmRSS"], 1),
              "server_tracebacks": tracebacks, "cases": rows,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(), "loadavg_after": [round(x, 2) for x in os.getloadavg()]}}
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
