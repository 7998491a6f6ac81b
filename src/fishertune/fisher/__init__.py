"""fishertune.fisher: the Fisher engine.

- :func:`diagonal_fisher`: empirical / Monte-Carlo / exact diagonal Fisher by per-layer hooks (Linear,
  Embedding, Conv1d/2d, LayerNorm, RMSNorm, BatchNorm, MultiheadAttention) with a torch.func fallback;
- :mod:`~fishertune.fisher.reductions` and :class:`FisherStore`: group reductions, named tasks, EMA,
  safetensors files;
- :mod:`~fishertune.fisher.kfac`: K-FAC factors and natural-gradient optimizers;
- :mod:`~fishertune.fisher.analysis`: capacity metrics, Lanczos spectra, sharpness, task overlap.

The core never imports fishertune.recsys.
"""

from fishertune.fisher.analysis import (CurvatureOperator, capacity_metrics, fisher_distance, group_importance,
                                        sharpness, spectral_density, task_overlap, top_eigenvalues)
from fishertune.fisher.estimators import (FisherResult, NonFiniteError, default_batch, diagonal_fisher,
                                          select_parameters)
from fishertune.fisher.hooks import Rule, register_rule
from fishertune.fisher.kfac import (DiagonalNaturalGradient, KFACBlock, KFACOptimizer, kfac_factors, l2_decay,
                                    rescale_moments)
from fishertune.fisher.likelihoods import (Bernoulli, CallableLikelihood, Categorical, Gaussian, Likelihood,
                                           Multinomial, get_likelihood)
from fishertune.fisher.plan import UnsupportedModuleError
from fishertune.fisher.reductions import reduce
from fishertune.fisher.store import FisherSignatureError, FisherStore
from fishertune.fisher.target import FisherTarget

__all__ = [
    "Bernoulli", "CallableLikelihood", "Categorical", "CurvatureOperator", "DiagonalNaturalGradient",
    "FisherResult", "FisherSignatureError", "FisherStore", "FisherTarget", "Gaussian", "KFACBlock",
    "KFACOptimizer", "Likelihood", "Multinomial", "NonFiniteError", "Rule", "UnsupportedModuleError",
    "capacity_metrics", "default_batch", "diagonal_fisher", "fisher_distance", "get_likelihood",
    "group_importance", "kfac_factors", "l2_decay", "reduce", "register_rule", "rescale_moments", "select_parameters",
    "sharpness", "spectral_density", "task_overlap", "top_eigenvalues",
]
