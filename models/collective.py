"""What the processes of one distributed job exchange (``torch.distributed`` collectives).

Apart from :mod:`models.distributed` (the launcher, which runs :mod:`models.pipeline` in every
process) so that a method can gather across processes without importing the pipeline.
"""
from __future__ import annotations

import torch

__all__ = ["all_gather_rows"]


def all_gather_rows(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """Every process's ``t`` (first dimensions may differ), concatenated in rank order, on the CPU."""
    import torch.distributed as dist

    world = dist.get_world_size()
    t = t.to(dev)
    n = torch.tensor([t.shape[0]], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    m = int(max(s.item() for s in sizes))
    pad = torch.zeros((m, *t.shape[1:]), dtype=t.dtype, device=dev)
    pad[:t.shape[0]] = t
    parts = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(parts, pad)
    return torch.cat([p[:int(s.item())].cpu() for p, s in zip(parts, sizes)])
