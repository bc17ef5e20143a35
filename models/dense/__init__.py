"""Dense alignment of small in-the-wild collections onto a learned canonical grid (after ASIC,
Gupta et al., ICCV 2023): collection method ``dense``. See docs/dense.md.

    from models.dense import fit_dense, DenseConfig, transfer_points
    fit = fit_dense(images)                      # (N, 3, H, W) in [0, 1]
    q = transfer_points(fit.flows.numpy(), 0, 5, [[10, 20]], fit.masks.numpy())

Submodules load lazily: :mod:`models.dense.transfer` and :mod:`models.dense.outputs` are
NumPy-only, and the service's API imports them without torch.
"""
from ..lazy import lazy_exports

_EXPORTS = {
    "DenseConfig": "asic", "DenseMethod": "asic", "DenseAligner": "asic", "fit_dense": "asic",
    "homographies": "asic", "MAX_IMAGES": "asic",
    "FeatureConfig": "features", "make_extractor": "features",
    "pseudo_correspondences": "matching",
    "make_collection": "synthetic",
    "transfer_points": "transfer", "pair_pck": "transfer", "cycle_pck": "transfer",
    "load_outputs": "outputs", "points_figure": "outputs",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
