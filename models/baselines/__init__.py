"""Classic congealing baselines as registered methods of the core.

``rasl`` and ``pssv`` (:mod:`.rasl`), ``tgrasta`` (:mod:`.tgrasta`), ``lsc``
(:mod:`.lsc`); shared linearised warping in :mod:`.linearise`; what
``congeal apply`` does with their saved models in :mod:`.aligners`.
Importing this package registers the methods and their model loaders.
"""
from . import linearise
from .aligners import ApplyConfig, SubspaceAligner, TemplateAligner
from .lsc import LSC, LscConfig
from .rasl import RASL, RaslConfig, rasl_inner, shrink_singular_values
from .tgrasta import TGrasta, TGrastaConfig, geodesic_step

__all__ = [
    "linearise",
    "ApplyConfig",
    "SubspaceAligner",
    "TemplateAligner",
    "RASL",
    "RaslConfig",
    "rasl_inner",
    "shrink_singular_values",
    "TGrasta",
    "TGrastaConfig",
    "geodesic_step",
    "LSC",
    "LscConfig",
]
