"""Validating a dataset: ``python -m service.dataset_check SPEC_JSON [PARENT_PID]``, one process per dataset.

Started by :class:`service.datasets.DatasetChecker` when a client completes a dataset. It runs
apart from the API process so that what a multi-GB collection costs to read can be bounded and
taken back: its anonymous memory is capped (``RLIMIT_DATA``; memory-mapped files do not count,
so arrays read through ``mmap`` cost only what is touched), it is killed past its time limit, and
a decoder that crashes takes down only this process. It reads the dataset exactly as a job will
(``models.imageio.scan_collection`` on the path the job gets), checks declared SHA-256s, writes
the image names to ``names.txt`` (one a line, so a job's ``reference`` can be checked without
keeping 10,000,000 names in a record), and prints one JSON line::

    {"ok": true, "n_images": N, "image_size": [H, W] | null, "channels": 1 | 3}
    {"ok": false, "status": 413 | 422, "error": "..."}

NumPy and Pillow only (through ``models.imageio``): never torch.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import sys
from pathlib import Path

__all__ = ["check", "main"]

_BLOCK = 1 << 20


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL from the kernel when the API process that started us dies (Linux): its check
    lease then lapses and a new ``complete`` starts the check again, with no orphan still at it."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(1)


def _limit_memory(n_bytes: int) -> None:
    try:
        resource.setrlimit(resource.RLIMIT_DATA, (n_bytes, n_bytes))
    except (ValueError, OSError):  # a lower hard limit is already in place: keep it
        pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def check(spec: dict) -> dict:
    from PIL import Image

    from models.imageio import InputError, LimitExceeded, LoadLimits, scan_collection

    files_dir = Path(spec["files_dir"])
    for f in spec["files"]:
        if f.get("sha256") and _sha256(files_dir / f["name"]) != f["sha256"]:
            return {"ok": False, "status": 422,
                    "error": f"{f['name']}: its content does not match the declared sha256 (upload it again)"}
    formats = set(spec["formats"])
    exts = tuple(e for fmt in formats for e in spec["format_extensions"][fmt])
    if spec["layout"] == "images":
        for f in spec["files"]:
            try:
                with Image.open(files_dir / f["name"]) as im:  # the header only: by content, not by name
                    fmt = (im.format or "").lower()
            except Exception:
                fmt = ""
            if fmt and fmt not in formats:
                return {"ok": False, "status": 422,
                        "error": f"{f['name']}: format {fmt.upper()} is not accepted here "
                                 f"(accepted: {', '.join(sorted(formats))})"}
    source = files_dir / spec["input_name"] if spec["input_name"] else files_dir
    names_tmp = Path(spec["names_out"] + ".tmp")
    n, size, channels = 0, None, 1
    uniform = True
    by_name = spec["members_by_name"]  # archives: their members' names are all there is to check
    try:
        with open(names_tmp, "w", encoding="utf-8") as out:
            for name, shape in scan_collection(source, LoadLimits(**spec["limits"])):
                if "\n" in name or "\r" in name:
                    return {"ok": False, "status": 422, "error": f"image name {name!r} holds a line break"}
                if by_name and name.lower().endswith((".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")) \
                        and not name.lower().endswith(exts):
                    # Archive members are held to the formats by their names, as uploads are.
                    return {"ok": False, "status": 422, "error": f"member {name!r} is not an accepted format "
                                                                 f"({', '.join(sorted(formats))})"}
                out.write(name + "\n")
                n += 1
                hw = [int(shape[0]), int(shape[1])]
                if size is None:
                    size = hw
                elif uniform and hw != size:
                    uniform = False
                if len(shape) == 3 and shape[2] == 3:
                    channels = 3
    except InputError as e:
        names_tmp.unlink(missing_ok=True)
        if "MemoryError" in str(e):
            # models.imageio reports a decoder's MemoryError as a corrupt image; here it is the cap.
            raise MemoryError(str(e)) from None
        return {"ok": False, "status": 413 if isinstance(e, LimitExceeded) else 422, "error": str(e)}
    os.replace(names_tmp, spec["names_out"])
    return {"ok": True, "n_images": n, "image_size": size if uniform else None, "channels": channels}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1:
        _die_with_parent(int(argv[1]))
    spec = json.loads(Path(argv[0]).read_text())
    import models.imageio  # noqa: F401  (imported before the cap: the cap is for the data, not the code)
    import PIL.Image  # noqa: F401

    _limit_memory(int(spec["memory_bytes"]))
    try:
        result = check(spec)
    except MemoryError:
        result = {"ok": False, "status": 413,
                  "error": f"reading it needs more than the {spec['memory_bytes']} bytes of memory a dataset's "
                           f"check may use (CONGEAL_DATASET_CHECK_MEMORY_BYTES)"}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
