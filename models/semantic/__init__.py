"""Semantic alignment: two different objects of one category (Rocco, Arandjelovic and Sivic, CVPR 2018).

A siamese feature extractor, the dense normalised correlation, regression CNNs for an affine map
then a thin-plate spline, and the soft-inlier count as the weakly supervised loss
(:mod:`models.semantic.model`); trained on pairs drawn from a user's collection
(:mod:`models.semantic.train`); registered as the pair method ``semantic``
(:mod:`models.semantic.method`), so ``congeal pair --method semantic`` and ``POST /pairs`` run it.

    from models.semantic import fit_semantic, save_model, load_model
    model, report = fit_semantic(images)          # (N, C, H, W) in [0, 1]
    out = model(source, target)                   # StageOutput: theta, tps_dst
    flow = model.flow(out, (H, W))                # (B, H, W, 2) normalised source positions

Submodules load lazily.
"""
from ..lazy import lazy_exports

_EXPORTS = {
    "SemanticConfig": "model", "SemanticModel": "model", "ConvFeatures": "model", "normalised_correlation": "model",
    "soft_inlier_count": "model", "save_model": "model", "load_model": "model", "StageOutput": "model",
    "TrainConfig": "train", "fit_semantic": "train", "FitReport": "train",
    "WarpSpec": "synthetic", "random_warps": "synthetic", "SemanticPairMethod": "method",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
