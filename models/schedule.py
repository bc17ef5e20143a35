"""How long DPRC trains, on what batches, at what learning rate: chosen from the collection and the device.

Training length is counted in *images seen* (``steps x batch``), not in epochs, so that a
10-million-image job does not pay ten epochs and a 50-image job does not pay a fixed step
count. The rule (every number is a :class:`models.dprc.DPRCConfig` field, so a job can override it):

* **batch**: 256 on a GPU at every collection size; 64 on a CPU. A larger GPU batch only lengthens
  a job at a fixed step count (a 28 px step of 1,024 takes 38.5 ms on an H100, one of 256
  13.6 ms), and it cost quality at scale: the 1,000,000-image job at 1,024 a step (peak learning
  rate 2e-3) zoomed in (content kept 0.67, re-fitted to an object ratio of 0.167, 141.7 s), or with
  the equivariance distance in frame units lost 91 % of its frames, while at 256 with frame units
  it kept everything (object ratio 0.088, 47.0 s; docs/benchmarks.md, "Jobs, end to end"). On a
  CPU a step's cost is proportional to the batch, and more, smaller steps learn more per second.
* **steps**: ``min(steps_target, ceil(max_epochs N / batch))``: the same number of steps for
  every collection large enough to fill it (the network learns a function of the images, and at
  a fixed step count a larger batch only lowers the gradient noise), fewer for a small one, whose
  every image has then been seen ``max_epochs`` times. An explicit budget (``--epochs``) or
  ``steps`` overrides it.
* **learning rate**: ``lr * sqrt(batch / 256)`` for a batch set above 256 (the square-root rule for Adam), reached
  by a linear warm-up over the first ``warmup`` fraction of training, then cosine decay to
  ``lr * lr_final``. At or below 256 there is no warm-up and no scaling: the schedule the quality
  tables were measured with.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Plan", "plan", "auto_batch"]

LR_REFERENCE_BATCH = 256


@dataclass(frozen=True)
class Plan:
    """One fit's schedule. ``batch_size`` is global (summed over every process of a
    distributed job); ``lr`` is the peak learning rate after the batch rule."""

    n_images: int
    batch_size: int
    steps: int
    lr: float
    lr_final: float
    warmup_steps: int

    @property
    def samples(self) -> int:
        """Images seen in training (with repeats)."""
        return self.steps * self.batch_size

    @property
    def epochs(self) -> float:
        return self.samples / max(1, self.n_images)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (0.1 + 0.9 * step / self.warmup_steps)
        s = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (self.lr_final + (1 - self.lr_final) * 0.5 * (1 + math.cos(math.pi * s)))

    def to_dict(self) -> dict:
        return {"n_images": self.n_images, "batch_size": self.batch_size, "steps": self.steps,
                "samples": self.samples, "epochs": round(self.epochs, 3), "lr": self.lr,
                "lr_final": self.lr_final, "warmup_steps": self.warmup_steps}


def auto_batch(n: int, device_type: str, gpu: int = 256, cpu: int = 64) -> int:
    """The default batch on a device of this type (``"cuda"``, ``"cpu"``, ...); :func:`plan`
    caps it at the collection's ``n``."""
    return gpu if device_type == "cuda" else cpu


def plan(n: int, device_type: str, *, batch_size: int | None, steps: int | None, epochs: int | None,
         steps_target: int, max_epochs: int, lr: float, lr_final: float, warmup: float,
         world: int = 1) -> Plan:
    """The schedule for ``n`` images (see the module docstring).

    ``world`` processes share each step; the batch is made a multiple of it (each takes an
    equal share) and is never larger than the collection.
    """
    if n < 1:
        raise ValueError("no images to train on")
    B = int(batch_size) if batch_size else auto_batch(n, device_type)
    B = max(world, min(B, n))
    B -= B % world
    if epochs is not None:
        total = max(1, math.ceil(int(epochs) * n / B))
    elif steps is not None:
        total = max(1, int(steps))
    else:
        total = max(1, min(int(steps_target), math.ceil(max_epochs * n / B)))
    big = B > LR_REFERENCE_BATCH
    peak = lr * math.sqrt(B / LR_REFERENCE_BATCH) if big else lr
    return Plan(n_images=n, batch_size=B, steps=total, lr=peak, lr_final=lr_final,
                warmup_steps=int(round(warmup * total)) if big else 0)
