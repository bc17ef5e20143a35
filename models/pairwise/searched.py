"""The pair method ``search``: a pair's homography by a classic global search, no network.

Three closed-form stages of :mod:`models.pairwise.search`, nothing pretrained and nothing trained:

1. :func:`~models.pairwise.search.global_search`: a similarity search by FFT correlation of unsigned
   gradient-orientation histograms (which survive changes of modality), then block matching and
   RANSAC rounds to a full homography; the best candidate by its final correlation is kept;
2. :func:`~models.pairwise.search.refine_homography` (``refine``, on by default): a dense sub-pixel
   refinement, ECC on orientation fields, kept only where it raises their correlation;
3. the confidence, :func:`~models.pairwise.search.block_agreement`: the share of the target's
   textured blocks that, matched on their own, agree with the homography to within a pixel.

This is the ``learned`` method's start (:mod:`models.pairwise.learned`) without its network: with the
homography held, that network changed neither the matrix nor the confidence, and it cost more than
half of a pair's time on a CPU. The same seed gives the same matrix as ``learned`` with
``search_joint=False`` (a test checks it).

Batched: every pair of a call goes through each stage together; a pair's answer does not depend on
the other pairs of its batch (RANSAC's random numbers are drawn for the whole batch at once). Device
and dtype follow the images. Matrices are ``source_from_target`` in normalised coordinates
(:mod:`models.pairwise.methods`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .methods import ConfigPairMethod, register_pair_method
from .search import SearchConfig, block_agreement, global_search, refine_homography

__all__ = ["SearchFit", "SearchMethod", "SearchMethodConfig", "search_pairs"]


@dataclass(frozen=True)
class SearchMethodConfig:
    """Options of the ``search`` method (``--option KEY=VALUE`` on the command line); they map onto
    :class:`~models.pairwise.search.SearchConfig`, whose other fields keep their defaults."""

    size: int = SearchConfig.size  # longer side of the similarity search's level, px
    candidates: int = SearchConfig.candidates  # similarities refined by block matching
    refine: bool = True  # the dense sub-pixel refinement after the search
    seed: int = 0  # RANSAC's random numbers (the pair job's seed replaces it)

    def __post_init__(self):
        for name, lo, hi in (("size", 16, 512), ("candidates", 1, 32), ("seed", None, None)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an integer, not {v!r}")
            if lo is not None and not lo <= v <= hi:
                raise ValueError(f"{name} must be from {lo} to {hi}, not {v}")
        if not isinstance(self.refine, bool):
            raise TypeError(f"refine must be true or false, not {self.refine!r}")

    def search_config(self) -> SearchConfig:
        """The global search's configuration: like the learned method's with one start, the best
        ``min(candidates, 2)`` go on to the finer block-matching rounds."""
        return SearchConfig(size=self.size, candidates=self.candidates, keep=min(self.candidates, SearchConfig.keep))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SearchFit:
    """What :func:`search_pairs` returns."""

    source_from_target_norm: torch.Tensor  # (B, 3, 3), normalised coordinates
    confidence: torch.Tensor  # (B,) in [0, 1): block agreement of the final homography
    score: torch.Tensor  # (B,) the search's correlation of its best candidate, in [-1, 1]
    refined: torch.Tensor  # (B,) bool: the refinement moved the homography (it raised the correlation)
    blocks_counted: torch.Tensor  # (B,) textured blocks block agreement counted
    history: list[dict] = field(default_factory=list)


@torch.no_grad()
def search_pairs(source: torch.Tensor, target: torch.Tensor, cfg: SearchMethodConfig | None = None,
                 progress: Callable[[int, int, str], None] | None = None,
                 should_stop: Callable[[], None] | None = None) -> SearchFit:
    """Each pair's homography by the global search and the refinement, and its block agreement.

    Args:
        source: ``(B, Cs, Hs, Ws)`` float in [0, 1]; target: ``(B, Ct, Ht, Wt)`` (channel counts may differ).
        progress: ``progress(done, total, stage)`` after each stage (3 in all).
        should_stop: called between stages and within the global search (each pair, each round);
            raise from it to stop.

    Returns:
        :class:`SearchFit`; ``source_from_target_norm`` maps normalised target coordinates to
        normalised source coordinates (``target(p) ~ source(M p)``).
    """
    if source.ndim != 4 or target.ndim != 4 or source.shape[0] != target.shape[0]:
        raise ValueError(f"source and target must be (B, C, H, W) with one B, got {tuple(source.shape)} "
                         f"and {tuple(target.shape)}")
    cfg = cfg or SearchMethodConfig()
    report = progress or (lambda done, total, stage: None)
    stop = should_stop or (lambda: None)
    # The learned method's generator, seeded alike: its search draws the same RANSAC samples.
    gen = torch.Generator(device=source.device).manual_seed(cfg.seed)
    scfg = cfg.search_config()
    stop()
    cands, scores = global_search(source, target, scfg, generator=gen, should_stop=should_stop)  # (B, K, 3, 3)
    M, score = cands[:, 0], scores[:, 0]
    history = [{"search_scores": scores.tolist()}]
    report(1, 3, "search")
    refined = torch.zeros(M.shape[0], dtype=torch.bool, device=M.device)
    if cfg.refine:
        stop()
        R, corr = refine_homography(source, target, M, scfg)
        refined = ~(R == M).flatten(1).all(1)
        M = R
        history.append({"refine_scores": corr.tolist()})
    report(2, 3, "refinement")
    stop()
    agree, counted = block_agreement(source, target, M, scfg)  # its agreement fields are the defaults
    history.append({"block_agreement": agree.tolist(), "blocks_counted": counted.tolist()})
    report(3, 3, "confidence")
    return SearchFit(M, agree, score, refined, counted, history)


@register_pair_method("search")
class SearchMethod(ConfigPairMethod):
    """The pair method ``search``: :func:`search_pairs` with a :class:`SearchMethodConfig` from options."""

    name = "search"
    config_cls = SearchMethodConfig
    # The learned method's threshold, on the same measure (block agreement; docs/pairwise.md): about
    # a quarter of the textured blocks must agree with the homography.
    min_confidence = 0.25

    @staticmethod
    def fit(source, target, cfg, progress, should_stop):
        return search_pairs(source, target, cfg, progress=progress, should_stop=should_stop)
