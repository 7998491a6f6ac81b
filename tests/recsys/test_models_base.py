"""The Recommender interface, the model registry and the discriminated model config."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from pydantic import Field

from fishertune.config import ConfigError, StrictModel, validate
from fishertune.recsys.models import (EASE, ModelConfig, MultVAE, MultVAEConfig, Popularity, Recommender,
                                      build_model, get_model_class, register_model, registered_models)


class _Holder(StrictModel):
    model: ModelConfig


def test_registry_lists_the_builtin_models():
    assert {"popularity", "ease", "multdae", "multvae"} <= set(registered_models())
    assert get_model_class("ease") is EASE
    assert EASE.name == "ease" and not EASE.iterative and MultVAE.iterative


def test_model_config_is_discriminated_on_name():
    cfg = validate(_Holder, {"model": {"name": "multvae", "latent_dim": 50}}).model
    assert isinstance(cfg, MultVAEConfig) and cfg.latent_dim == 50 and cfg.hidden_dims == [600]
    assert validate(_Holder, {"model": {"name": "ease"}}).model.lambda_ == 500.0


def test_model_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="lamda"):
        validate(_Holder, {"model": {"name": "ease", "lamda": 3}})
    with pytest.raises(ConfigError, match="model"):
        validate(_Holder, {"model": {"name": "no-such-model"}})
    with pytest.raises(ConfigError, match="lambda_"):
        validate(_Holder, {"model": {"name": "ease", "lambda_": -1}})


def test_build_model_from_dict_and_config():
    m = build_model({"name": "multvae", "hidden_dims": [16], "latent_dim": 4}, n_users=5, n_items=12)
    assert isinstance(m, MultVAE) and m.encoder[0].in_features == 12 and m.encoder[-1].out_features == 8
    assert isinstance(build_model(MultVAEConfig(), 3, 7), MultVAE)
    assert isinstance(build_model({"name": "popularity"}, 3, 7), Popularity)


def test_build_model_errors():
    with pytest.raises(ConfigError, match="unknown model 'nope'.*ease"):
        build_model({"name": "nope"}, 3, 7)
    with pytest.raises(ConfigError, match="no 'name'"):
        build_model({"lambda_": 3}, 3, 7)
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        build_model({"name": "ease", "bogus": 1}, 3, 7)
    with pytest.raises(ValueError, match="n_items"):
        build_model({"name": "ease"}, 3, 0)


def test_build_model_seed_is_deterministic_and_leaves_global_rng_alone():
    cfg = {"name": "multvae", "hidden_dims": [8], "latent_dim": 3}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_model(cfg, 4, 10, seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # global stream untouched
    b = build_model(cfg, 4, 10, seed=7)
    c = build_model(cfg, 4, 10, seed=8)
    for (ka, va), (_, vb), (_, vc) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items()):
        assert torch.equal(va, vb), ka
    assert not torch.equal(a.encoder[0].weight, c.encoder[0].weight)


def test_register_model_checks_its_input():
    class BadCfg(StrictModel):
        name: Literal["other"] = "other"

    class Bad(Recommender):
        config_class = BadCfg

    with pytest.raises(TypeError, match="defaults to 'other'"):
        register_model("mismatch")(Bad)
    with pytest.raises(TypeError, match="not a Recommender"):
        register_model("x")(int)
    with pytest.raises(ValueError, match="already registered"):
        register_model("ease")(Popularity)


class _ConstCfg(StrictModel):
    name: Literal["test-const"] = "test-const"
    value: float = Field(1.0)


@register_model("test-const")
class _Const(Recommender):
    config_class = _ConstCfg

    def score(self, users, history):
        return torch.full(history.shape, self.cfg.value)


def test_a_new_model_registers_without_touching_anything_else():
    m = build_model({"name": "test-const", "value": 2.5}, 2, 3)
    out = m.score(torch.tensor([0, 1]), torch.zeros(2, 3))
    assert torch.equal(out, torch.full((2, 3), 2.5))
    with pytest.raises(NotImplementedError, match="closed-form"):
        m.training_step(torch.zeros(2, 3), 0)
    assert m.device() == torch.device("cpu")
