"""Deltas: save only what changed + the strategy; reload onto the base gives identical outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fishertune.tune.delta import (
    base_fingerprint,
    diff_state,
    load_delta,
    read_delta,
    save_delta,
)
from fishertune.tune.smalldata import adapt_batchnorm, image_transform
from fishertune.tune.strategies import apply, get_strategy
from fishertune.zoo.cifar_resnet import CifarResNet


def _base() -> CifarResNet:
    torch.manual_seed(0)
    m = CifarResNet(20).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_var.uniform_(0.5, 2.0)
    return m


X = torch.rand(4, 3, 32, 32)


def test_head_only_round_trip_identical_outputs_with_a_fresh_head(tmp_path: Path) -> None:
    model = _base()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    strat = get_strategy("head_only")
    rep = apply(model, strat)
    with torch.no_grad():
        model.linear.weight.add_(0.1)
        model.linear.bias.sub_(0.2)
    info = save_delta(tmp_path / "d.safetensors", model, base_state, strat, always=rep.params)
    assert info["stored"] == ["linear.bias", "linear.weight"] and info["sparse"] == []
    assert info["stored_entries"] == 650
    # the head is stored in full: reloading onto a base whose head was initialised differently works
    other = _base()
    with torch.no_grad():
        other.linear.weight.normal_()
        other.linear.bias.normal_()
    got = load_delta(tmp_path / "d.safetensors", other)
    assert got["strategy"]["name"] == "head_only"
    assert get_strategy(got["strategy"]) == strat
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(other(X), model.eval()(X))


def test_unchanged_trained_head_is_still_saved(tmp_path: Path) -> None:
    model = _base()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    info = save_delta(tmp_path / "d.safetensors", model, base_state, "head_only",
                      always=["linear.weight", "linear.bias"])
    assert info["stored"] == ["linear.bias", "linear.weight"]
    assert save_delta(tmp_path / "e.safetensors", model, base_state)["stored"] == []


def test_sparse_mask_changes_and_bn_statistics_round_trip(tmp_path: Path) -> None:
    model = _base()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    adapt_batchnorm(model, (torch.rand(6, 3, 32, 32) * 255).to(torch.uint8), image_transform([]), alpha=0.3)
    with torch.no_grad():  # a FISH-mask-like change: 3 entries of one conv
        w = model.layer2[0].conv1.weight.view(-1)
        w[[5, 17, 100]] += 1.0
    info = save_delta(tmp_path / "d.safetensors", model, base_state, get_strategy("bn_adapt"))
    assert "layer2.0.conv1.weight" in info["sparse"]
    assert all(k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked", "weight")
               for k in info["stored"])
    assert sum(k.endswith("running_mean") for k in info["stored"]) == 19   # every BN layer
    tensors, _ = read_delta(tmp_path / "d.safetensors")
    assert tensors["layer2.0.conv1.weight::index"].tolist() == [5, 17, 100]
    base = _base()
    load_delta(tmp_path / "d.safetensors", base)
    for k, v in model.state_dict().items():
        assert torch.equal(base.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(base(X), model(X))


def test_refuses_another_base_and_bad_files(tmp_path: Path) -> None:
    model = _base()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.layer1[0].bn1.bias.add_(1.0)
    save_delta(tmp_path / "d.safetensors", model, base_state, "bitfit")
    other = CifarResNet(20)
    with pytest.raises(ValueError, match="another base model"):
        load_delta(tmp_path / "d.safetensors", other)
    load_delta(tmp_path / "d.safetensors", other, check_base=False)
    assert torch.equal(other.layer1[0].bn1.bias, model.layer1[0].bn1.bias)
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a fishertune delta"):
        load_delta(tmp_path / "plain.safetensors", other)
    with pytest.raises(FileNotFoundError):
        load_delta(tmp_path / "missing.safetensors", other)
    with pytest.raises(ValueError, match="differ in tensors"):
        diff_state({"a": torch.zeros(1)}, {"b": torch.zeros(1)})
    with pytest.raises(ValueError, match="always names tensors"):
        save_delta(tmp_path / "x.safetensors", model, base_state, always=["nope"])


def test_bitwise_comparison_sees_negative_zero_and_nan() -> None:
    a = {"t": torch.tensor([0.0, float("nan")])}
    assert diff_state(a, {"t": torch.tensor([0.0, float("nan")])}) == {}
    assert list(diff_state(a, {"t": torch.tensor([-0.0, float("nan")])})) == ["t"]
    assert base_fingerprint(a) == base_fingerprint({"t": torch.tensor([0.0, float("nan")])})
