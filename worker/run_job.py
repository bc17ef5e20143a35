"""The training child: ``python -m worker.run_job RUN_JSON --progress-fd N --parent-pid P``
(or ``--standby --control-fd C`` instead of RUN_JSON: started ahead, told its job later).

Started by :class:`service.execution.runner.JobRunner`, one process per
attempt, in its own process group. This is the only process that imports
torch or touches CUDA, so the GPU is clean at the start of every job and all
its memory is returned when the job ends. It reads the job's spec (written
by the supervisor into the artifact store), calls ``models.pipeline``, builds
the aligned-images zip, and reports progress and the outcome as JSON lines
(protocol in :mod:`service.execution.runner`).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import threading
import traceback
import zipfile
from pathlib import Path

from service.contracts.artifacts import ARRAY_RESULT_FILES
from service.execution.runner import EXIT_CANCELLED, EXIT_INPUT, EXIT_INTERNAL, EXIT_OK, read_summary

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL us when the supervisor dies (Linux), so a worker
    killed mid-job never leaves a training run writing into the checkpoint
    folder that the redelivered job resumes from."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the getppid() check in should_stop remains
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(EXIT_INTERNAL)


class _Events:
    def __init__(self, fd: int):
        self.fd = fd

    def send(self, obj: dict) -> None:
        # One write per line; a vanished supervisor raises BrokenPipeError and ends us.
        os.write(self.fd, (json.dumps(obj, allow_nan=False, default=str) + "\n").encode())


def _finite(v):
    return v if v is None or (isinstance(v, (int, float)) and v == v and abs(v) != float("inf")) else None


def _zip_aligned(out_dir: Path, zip_path: Path) -> None:
    """All aligned images in one archive (PNGs under their names in transforms.json, or the uint8
    shards of a large job), with transforms.json. None when the job wrote no aligned images."""
    transforms = json.loads((out_dir / "transforms.json").read_text())
    listed = [im["aligned_file"] for im in transforms.get("images") or [] if im.get("aligned_file")]
    if listed:
        files = listed
    else:
        files = sorted(p.relative_to(out_dir).as_posix() for p in (out_dir / "aligned").glob("shard-*.npy"))
    if not files:
        return
    tmp = zip_path.with_name(zip_path.name + ".tmp")
    # PNGs and shards are compressed already or incompressible noise: storing is as small and much faster.
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for f in files:
            zf.write(out_dir / f, arcname=f[len("aligned/"):])
        zf.write(out_dir / "transforms.json", arcname="transforms.json")
    os.replace(tmp, zip_path)


def run(spec: dict, events: _Events, should_stop) -> int:
    # Imported here, after the process exists on its own, so the supervisor never loads torch.
    from models.imageio import InputError, LoadLimits
    from models.methods import Cancelled
    from models.pipeline import AlignOptions, align_collection, apply_model

    def progress(p) -> None:
        events.send({"type": "progress", "stage": p.stage, "step": p.step, "total": p.total, "epoch": p.epoch,
                     "loss": _finite(p.loss), "apsnr": _finite(p.apsnr), "eta_s": _finite(p.eta_s),
                     "message": p.message})

    limits = LoadLimits(**spec["limits"])
    out = Path(spec["output_dir"])
    try:
        if spec["kind"] == "align":
            o = spec["options"]
            opts = AlignOptions(method=o["method"], warp=o["warp"], reference=o["reference"], budget=o["budget"],
                                seed=o["seed"], device=spec["device"], max_side=o["max_side"],
                                method_options=spec["method_options"], aligned=o.get("aligned", "auto"),
                                gpus=o.get("gpus", 1))
            # overwrite: an earlier attempt may have finished writing and died before recording it.
            align_collection(spec["input_path"], out, opts, progress=progress, checkpoint_dir=spec["checkpoint_dir"],
                             should_stop=should_stop, limits=limits, overwrite=True)
        elif spec["kind"] == "pair":
            summary = _run_pairs(spec, out, progress, should_stop, limits)
            if should_stop():
                raise Cancelled("cancelled")
            events.send({"type": "result", "summary": summary})
            return EXIT_OK
        else:
            if not spec["model_dir"] or not (Path(spec["model_dir"]) / "pipeline.json").is_file():
                raise InputError("the trained model for this job is missing from the artifact store")
            apply_model(spec["model_dir"], spec["input_path"], out, device=spec["device"], progress=progress,
                        limits=limits, overwrite=True)
        if should_stop():
            raise Cancelled("cancelled")
        _zip_aligned(out, Path(spec["aligned_zip"]))
        arrays = [n for n in ARRAY_RESULT_FILES if (out / n).is_file()]
        events.send({"type": "result", "summary": {**read_summary(out), "array_files": arrays}})
        return EXIT_OK
    except Cancelled:
        events.send({"type": "error", "kind": "cancelled", "message": "cancelled"})
        return EXIT_CANCELLED
    except InputError as e:
        events.send({"type": "error", "kind": "input", "message": str(e)})
        return EXIT_INPUT
    except BrokenPipeError:
        return EXIT_INTERNAL
    except Exception as e:
        traceback.print_exc()
        events.send({"type": "error", "kind": "internal", "message": f"{type(e).__name__}: {e}"})
        return EXIT_INTERNAL


def _run_pairs(spec: dict, out: Path, progress, should_stop, limits) -> dict:
    """A pair job: the request the API wrote beside the uploads, run by models.pairwise."""
    from models.imageio import InputError
    from models.pairwise.pipeline import PairOptions, run_pairs

    try:
        req = json.loads(Path(spec["pair_request"]).read_text())
    except (OSError, ValueError, TypeError) as e:
        raise InputError(f"the pair request of this job is missing or unreadable ({e})") from None
    o = req["options"]
    opts = PairOptions(method=o["method"], device=spec["device"], max_side=o["max_side"], seed=o["seed"],
                       method_options=o.get("method_options") or {}, min_confidence=o.get("min_confidence"))
    try:
        # overwrite: an earlier attempt may have finished writing and died before recording it.
        return run_pairs([tuple(p) for p in req["pairs"]], out, opts, points=req.get("points"), progress=progress,
                         should_stop=should_stop, limits=limits, collection=spec["input_path"], overwrite=True)
    except ImportError as e:  # a reference method whose library this worker lacks: the request's to change
        raise InputError(f"method {opts.method} is not available on this worker: {e}") from None


def _standby(control_fd: int) -> str | None:
    """Start a job's imports before the job exists, then wait for it (``--standby``).

    The supervisor keeps one such child ready, so a job does not wait for Python, torch and
    the methods to load (a ``torch.optim`` optimiser's first construction also imports ``torch._dynamo``,
    which the pair, semantic and dense methods' optimisers still do; DPRC's trainer does not).
    Its order is one line on ``control_fd``: ``{"spec": RUN_JSON, "log": LOG}``; the job's output
    then goes to LOG. Returns RUN_JSON, or None when the supervisor closed the pipe instead.
    """
    import torch

    import models.pipeline  # noqa: F401  (the methods, the readers and writers)

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(control_fd, 4096)
        if not chunk:
            return None
        line += chunk
    os.close(control_fd)
    order = json.loads(line)
    fd = os.open(order["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return order["spec"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m worker.run_job")
    ap.add_argument("spec", nargs="?", help="the job's run.json (or --standby)")
    ap.add_argument("--standby", action="store_true", help="load first, then read the job from --control-fd")
    ap.add_argument("--control-fd", type=int)
    ap.add_argument("--progress-fd", type=int, required=True)
    ap.add_argument("--parent-pid", type=int, required=True)
    args = ap.parse_args(argv)
    if (args.spec is None) != args.standby or (args.standby and args.control_fd is None):
        ap.error("give the run.json, or --standby with --control-fd")
    _die_with_parent(args.parent_pid)

    stop = threading.Event()
    # SIGTERM is the supervisor's cancel: finish the current step, then stop cleanly.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def should_stop() -> bool:
        return stop.is_set() or os.getppid() != args.parent_pid

    spec_path = args.spec
    if args.standby:
        spec_path = _standby(args.control_fd)
        if spec_path is None:  # the supervisor closed: no job for us
            return EXIT_OK
    spec = json.loads(Path(spec_path).read_text())
    try:
        return run(spec, _Events(args.progress_fd), should_stop)
    except BrokenPipeError:
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
