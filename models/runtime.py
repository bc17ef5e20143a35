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

__all__ = ["resolve_device", "StagedOutput"]


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``auto`` -> first CUDA device if any, else CPU; otherwise as given."""
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {spec}: CUDA is not available on this machine")
    return dev


class StagedOutput:
    """Write into ``OUT.tmp-<id>`` and rename to ``OUT`` on success."""

    def __init__(self, out_dir: Path, overwrite: bool):
        self.out_dir = out_dir
        if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
            raise InputError(f"{out_dir}: output folder exists and is not empty (use --overwrite)")
        self.tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"

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
