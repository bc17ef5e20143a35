"""The pair method ``semantic``: a trained :class:`~models.semantic.model.SemanticModel` as a dense pair
method of :mod:`models.pairwise` (``congeal pair --method semantic``, ``POST /pairs``).

Options (``--option KEY=VALUE``, the service's ``options``):

* ``model``: a model folder (``config.json`` + ``semantic.safetensors``) to use as it is; without one
  the method trains on the job's images first (:func:`models.pairwise.pipeline.run_pairs` calls
  :meth:`SemanticPairMethod.fit_collection`) and the job writes the model to ``OUT/model/``, reusable
  with ``model=OUT/model``;
* ``features``: an operator's safetensors file to start the feature extractor from
  (:meth:`~models.semantic.model.ConvFeatures.from_safetensors`); ``freeze_features``: keep it fixed;
* ``synthetic_steps``, ``weak_steps``, ``batch``, ``seed``: the training (:class:`~models.semantic.train.TrainConfig`);
  ``size``: the network's input side.

Confidence: the share of the final correlation's match energy (``s^2``, which sums to 1 over the
source for each target cell) that lies within the inlier radius of where the map sends each target
cell; 1 when every match agrees with the map.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..imageio import InputError
from ..methods import Progress
from ..pairwise.methods import PairContext, PairEstimate, register_pair_method
from .model import SemanticConfig, SemanticModel, load_model, match_share, save_model
from .train import TrainConfig, fit_semantic

__all__ = ["SemanticPairMethod", "images_to_tensor"]

_TRAIN = ("synthetic_steps", "weak_steps", "batch", "seed", "freeze_features", "weak_synthetic", "weak_lr", "weak_bn_frozen")


def images_to_tensor(images, size: int, channels: int) -> torch.Tensor:
    """``(H, W[, 3])`` arrays (uint8 or float in [0, 1]) of any sizes -> ``(N, channels, size, size)`` float32."""
    out = []
    for im in images:
        a = np.asarray(im)
        x = torch.from_numpy(np.array(a, np.float32))
        if a.dtype == np.uint8:
            x = x / 255.0
        x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
        if x.shape[0] == 3 and channels == 1:
            x = (x * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0, keepdim=True)
        elif x.shape[0] == 1 and channels == 3:
            x = x.expand(3, -1, -1)
        out.append(F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0])
    return torch.stack(out)


@register_pair_method("semantic")
class SemanticPairMethod:
    """Affine + thin-plate-spline maps between two instances of one category."""

    name = "semantic"
    # Below this confidence a pair is reported as not aligned. Chance (a flat correlation) is
    # (2 r + 1)^2 / cells = 9 / 144 = 0.0625 at the default size. Measured with the default training
    # (bench/semantic.py --confidence, docs/semantic.md): 0.084-0.094 on digit pairs of the class,
    # 0.080-0.089 with another digit, 0.059-0.068 with noise: it tells unrelated content apart, not a
    # wrong category.
    min_confidence = 0.075

    def __init__(self, model: str | None = None, features: str | None = None, size: int | None = None, **train):
        unknown = sorted(set(train) - set(_TRAIN))
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; known: model, features, size, {', '.join(_TRAIN)}")
        if model is not None and (features is not None or train or size is not None):
            raise ValueError("option 'model' uses a trained model as it is: no features, size or training options")
        self.train = TrainConfig(**train)
        self.cfg = SemanticConfig(**({"size": int(size)} if size is not None else {}))
        self.features = features
        self.model: SemanticModel | None = None
        self.notes: list[str] = []
        if model is not None:
            try:
                self.model = load_model(model)
            except (ValueError, OSError) as e:
                raise ValueError(f"model {model}: {e}") from None
        elif features is not None:
            SemanticModel.from_feature_file(features)  # a bad file fails now, before any image is read

    def fit_collection(self, images, device: torch.device, progress: Callable[[Progress], None] | None = None,
                       should_stop: Callable[[], bool] | None = None) -> bool:
        """Train on ``images`` (arrays) unless a model was given; True if it trained."""
        if self.model is not None:
            return False
        if len(images) < 2:
            raise InputError("method semantic trains on the job's images: it needs at least 2")
        start = (SemanticModel.from_feature_file(self.features, size=self.cfg.size) if self.features is not None
                 else SemanticModel(self.cfg))
        x = images_to_tensor(images, start.cfg.size, start.cfg.in_channels).to(device)
        self.model, rep = fit_semantic(x, start.cfg, self.train, model=start.to(device), progress=progress,
                                       should_stop=should_stop)
        self.notes.append(f"trained on {len(images)} images in {rep.seconds:.1f}s")
        return True

    def save(self, model_dir: Path) -> None:
        if self.model is None:
            raise ValueError("no model to save")
        save_model(self.model, model_dir, {"train": self.train.to_dict()})

    @torch.no_grad()
    def estimate(self, source: torch.Tensor, target: torch.Tensor, ctx: PairContext) -> PairEstimate:
        if self.model is None:  # called without run_pairs: learn from this batch's images
            ims = [x.permute(1, 2, 0).cpu().numpy() for x in torch.cat([source, target])]
            with torch.enable_grad():
                self.fit_collection(ims, source.device, should_stop=ctx.should_stop)
        m = self.model.to(source.device).eval()
        ctx.check_stop()
        out = m(source, target)
        B = source.shape[0]
        conf = match_share(m, out)
        M = torch.cat([out.theta, out.theta.new_tensor([0, 0, 1]).expand(B, 1, 3)], dim=1)
        return PairEstimate(M, conf, list(self.notes), tps_dst=out.tps_dst, tps_grid=m.cfg.tps_grid)
