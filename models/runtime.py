"""What every entry point of the core needs: the device to run on, and an output folder that
appears only once it is complete. Shared by :mod:`models.pipeline` (collections) and
:mod:`models.pairwise` (pairs)."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import torch

from .imageio import InputError

__all__ = ["resolve_device", "check_out_dir", "StagedOutput"]


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``auto`` -> first CUDA device if any, else CPU; otherwise as given, checked to exist here.

    Raises:
        InputError: a spec torch does not read, or a CUDA device this machine does not have.
    """
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise InputError(f"--device {spec}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {spec}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse an output folder that cannot be written: checked before any work, so a bad ``--out``
    costs a second, not a training run.

    Raises:
        InputError: ``out_dir`` is not a folder, is not empty (without ``overwrite``), or cannot be
        created or written in.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise InputError(f"{out_dir}: exists and is not a folder")
        if not overwrite and any(out_dir.iterdir()):
            raise InputError(f"{out_dir}: output folder exists and is not empty (use --overwrite)")
    # The output is staged in a sibling folder and renamed into place: its parent must be writable
    # (or creatable, from the nearest folder that exists).
    parent = out_dir.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{out_dir}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{out_dir}: cannot write in {parent}")


class StagedOutput:
    """Write into ``OUT.tmp-<id>`` and rename to ``OUT`` on success."""

    def __init__(self, out_dir: Path, overwrite: bool):
        self.out_dir = Path(out_dir)
        check_out_dir(self.out_dir, overwrite)  # again: the folder may have been filled while the job ran
        self.tmp = self.out_dir.parent / f".{self.out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.out_dir.exists():
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out_dir, old)
        os.replace(self.tmp, self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False
