"""fishertune.tune: Fisher-guided fine-tuning (FisherTune, parameter masks, EWC, DR-FIM); the core
never imports recsys. See docs/tune.md."""

from fishertune.tune.drfim import dr_fim, masks_from_importance, normalize_importance, posterior_std
from fishertune.tune.fishertune import (FisherFn, FisherTuneConfig, FisherTuner, batch_gradient_fisher,
                                        build_perturbation, engine_fisher, resolve_groups)
from fishertune.tune.masking import ParameterMask
from fishertune.tune.perturb import Combined, FeatureShift, NoiseInjection, Perturbation, check_range
from fishertune.tune.presets import load_presets, preset_config
from fishertune.tune.regularize import EWCGradient, OnlineFisher, ewc_penalty
from fishertune.tune.schedule import AdaptiveOffset, delta_at

__all__ = [
    "AdaptiveOffset", "Combined", "EWCGradient", "FeatureShift", "FisherFn", "FisherTuneConfig", "FisherTuner",
    "NoiseInjection", "OnlineFisher", "ParameterMask", "Perturbation", "batch_gradient_fisher", "build_perturbation", "check_range",
    "delta_at", "dr_fim", "engine_fisher", "ewc_penalty", "load_presets", "masks_from_importance",
    "normalize_importance", "posterior_std", "preset_config", "resolve_groups",
]

# small-data strategies (helper D)
from fishertune.tune.delta import load_delta, read_delta, save_delta  # noqa: E402
from fishertune.tune.finetune import DataConfig, FinetuneConfig, TextClassifier, run_comparison  # noqa: E402
from fishertune.tune.smalldata import (FitResult, TrainConfig, adapt_batchnorm, finetune_small,  # noqa: E402
                                       image_transform, stratified_folds)
from fishertune.tune.strategies import (PRESETS, Rule, StrategyConfig, TrainableReport, apply,  # noqa: E402
                                        get_strategy, match_modules, model_roles)

__all__ += ["DataConfig", "FinetuneConfig", "FitResult", "PRESETS", "Rule", "StrategyConfig", "TextClassifier",
            "TrainConfig", "TrainableReport", "adapt_batchnorm", "apply", "finetune_small", "get_strategy",
            "image_transform", "load_delta", "match_modules", "model_roles", "read_delta", "run_comparison",
            "save_delta", "stratified_folds"]
