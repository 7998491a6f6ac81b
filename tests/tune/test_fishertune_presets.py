"""Every FisherTune preset validates against FisherTuneConfig; the required presets exist."""

from __future__ import annotations

import pytest

from fishertune.config import ConfigError
from fishertune.tune import FisherTuneConfig, load_presets, preset_config

REQUIRED = {"baseline", "default", "conservative_shared", "aggressive_specific", "long_warmup", "frequent_fim",
            "all_features", "variational_only", "natural_gradient_only", "ewc_only", "adaptive_scheduler_only",
            "perturb_none", "perturb_edge_dropout", "perturb_popularity", "perturb_noise", "perturb_feature_shift",
            "perturb_combined", "performance", "speed", "stability"}


def test_required_presets_exist():
    assert REQUIRED <= set(load_presets())


@pytest.mark.parametrize("name", sorted(load_presets()))
def test_preset_validates(name):
    cfg = preset_config(name)
    assert isinstance(cfg, FisherTuneConfig)
    assert cfg.use_fishertune == (name != "baseline")


def test_all_features_turns_every_feature_on():
    cfg = preset_config("all_features")
    assert cfg.use_variational and cfg.use_adaptive_vi and cfg.use_natural_gradient
    assert cfg.use_fisher_regularization and cfg.use_adaptive_scheduler and cfg.perturbation_type == "combined"


def test_unknown_preset_and_bad_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown FisherTune preset 'nope'"):
        preset_config("nope")
    bad = tmp_path / "p.yaml"
    bad.write_text("x:\n  shared_delta_maxx: 0.5\n")
    with pytest.raises(ConfigError, match="unknown key 'shared_delta_maxx'"):
        preset_config("x", path=bad)
