"""Pairwise alignment: the homography between two images of one scene.

``search`` (the default) finds it by a classic global search on gradient orientations and a
dense refinement, no network (:mod:`models.pairwise.searched`); ``learned`` starts there and
moves it with a patch descriptor learned from scratch on the pair itself, jointly with the
homography (Dong et al., 3DV 2018; :mod:`models.pairwise.learned`); ``sift``, ``orb``, ``ecc``
and ``kornia`` are classic references (:mod:`models.pairwise.classic`,
``pip install 'congeal[bench]'``).

    from models.pairwise import PairOptions, align_pair
    r = align_pair("photo.png", "nir.png", PairOptions(method="search"))
    r.matrix, r.confidence, r.aligned, r.target_to_source([[10, 20]])

Submodules load lazily: :mod:`models.pairwise.points` is NumPy-only, and the service's API
imports it without torch.
"""
from ..lazy import lazy_exports

_EXPORTS = {
    "PairOptions": "pipeline", "PairInput": "pipeline", "PairResult": "pipeline", "align_pairs": "pipeline",
    "align_pair": "pipeline", "run_pairs": "pipeline", "read_pairs_file": "pipeline", "load_pairs": "pipeline",
    "write_pairs": "pipeline", "warp_source": "pipeline", "CONVENTION": "pipeline",
    "LearnedConfig": "learned", "fit_pairs": "learned",
    "SearchMethodConfig": "searched", "search_pairs": "searched",
    "PairContext": "methods", "PairEstimate": "methods", "register_pair_method": "methods",
    "target_to_source": "points", "source_to_target": "points",
    "dense_target_to_source": "dense", "dense_source_to_target": "dense", "dense_flow": "dense",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
