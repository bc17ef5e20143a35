"""One congealing job over several processes, one per GPU: the launcher and each process's entry.

    congeal align digits/ --out r/ --gpus 2            # two GPUs of this host
    congeal align digits/ --out r/ --gpus 2 --device cpu   # two CPU processes over gloo (CI)

:func:`launch` writes the job's spec, starts ``torchrun --standalone --nproc-per-node N -m
models.distributed SPEC`` and relays rank 0's progress. Every process
(:func:`main`) joins the process group (NCCL on GPUs, gloo on CPUs), reads its contiguous shard
of the collection (:func:`models.methods.shard_bounds`) and trains the same DPRC with
``DistributedDataParallel``: each takes an equal share of every step's batch, so a step sees the
same number of images as on one device and the schedule is the one a single device would run.
Rank 0 also reads the whole collection, gathers every process's warps and writes the outputs,
exactly as a one-device job does. The code assumes no number of GPUs: ``--gpus`` is the number of
processes, each on ``cuda:<local rank>``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

__all__ = ["launch", "main"]


def launch(source, out_dir, options, nproc: int, *, progress: Callable | None = None,
           checkpoint_dir=None, limits=None, overwrite: bool = False,
           should_stop: Callable[[], bool] | None = None):
    """Run :func:`models.pipeline.align_collection` as ``nproc`` processes; returns its report.

    Raises what the job raised on rank 0 (``InputError`` and ``Cancelled`` included).
    """
    from .imageio import InputError, LoadLimits
    from .methods import Cancelled, Progress
    from .pipeline import AlignReport

    limits = limits or LoadLimits()
    with tempfile.TemporaryDirectory(prefix="congeal-dist-") as td:
        td = Path(td)
        spec = {"source": str(Path(source).resolve()), "out_dir": str(Path(out_dir).resolve()),
                "options": asdict(options), "limits": asdict(limits), "overwrite": overwrite,
                "checkpoint_dir": None if checkpoint_dir is None else str(Path(checkpoint_dir).resolve()),
                "progress_file": str(td / "progress.jsonl"), "result_file": str(td / "result.json")}
        (td / "spec.json").write_text(json.dumps(spec))
        (td / "progress.jsonl").touch()
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1)
                                                                                            // nproc)))}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "models.distributed", str(td / "spec.json")]
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=open(td / "stderr.log", "wb"))
        done = threading.Event()

        def relay():
            with open(td / "progress.jsonl") as f:
                while True:
                    line = f.readline()
                    if line:
                        if progress is not None:
                            progress(Progress(**json.loads(line)))
                    elif done.is_set():
                        return
                    else:
                        time.sleep(0.2)

        t = threading.Thread(target=relay, daemon=True)
        t.start()
        try:
            while proc.poll() is None:
                if should_stop is not None and should_stop():
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait()
                    raise Cancelled("cancelled")
                time.sleep(0.2)
        except BaseException:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        finally:
            done.set()
            t.join(timeout=5)
        result = json.loads((td / "result.json").read_text()) if (td / "result.json").exists() else None
        if result is None or proc.returncode != 0:
            if result and result.get("error_kind") == "input":
                raise InputError(result["error"])
            if result and result.get("error_kind") == "cancelled":
                raise Cancelled("cancelled")
            tail = (td / "stderr.log").read_text(errors="replace")[-3000:]
            msg = result["error"] if result else f"the {nproc} processes failed (exit {proc.returncode})"
            raise RuntimeError(f"{msg}\n{tail}")
        return AlignReport(**result["report"])


def main(argv: list[str] | None = None) -> int:
    """One process of a distributed job: ``python -m models.distributed SPEC`` under torchrun."""
    import torch.distributed as dist

    from .imageio import InputError, LoadLimits
    from .methods import Cancelled
    from .pipeline import AlignOptions, align_collection

    spec = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    opts = AlignOptions(**spec["options"])
    cuda = opts.device != "cpu" and torch.cuda.is_available()
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def report(p) -> None:
        if rank == 0:
            with open(spec["progress_file"], "a") as f:
                f.write(json.dumps({k: v for k, v in asdict(p).items()}, allow_nan=False, default=str) + "\n")

    out = {}
    code = 0
    try:
        rep = align_collection(spec["source"], spec["out_dir"], AlignOptions(**{**spec["options"], "device": device}),
                               progress=report, checkpoint_dir=spec["checkpoint_dir"], should_stop=stop.is_set,
                               limits=LoadLimits(**spec["limits"]), overwrite=spec["overwrite"], rank=rank,
                               world=world)
        if rank == 0:
            out = {"report": asdict(rep)}
    except InputError as e:
        out, code = {"error_kind": "input", "error": str(e)}, 2
    except Cancelled:
        out, code = {"error_kind": "cancelled", "error": "cancelled"}, 3
    except Exception as e:  # noqa: BLE001 - reported to the launcher, then the process fails
        traceback.print_exc()
        out, code = {"error_kind": "internal", "error": f"{type(e).__name__}: {e}"}, 1
    if rank == 0 or code:
        tmp = spec["result_file"] + f".{rank}"
        Path(tmp).write_text(json.dumps(out))
        if rank == 0 or not Path(spec["result_file"]).exists():
            os.replace(tmp, spec["result_file"])
    if code == 0:
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
