"""Small-data training, BN adaptation, k-fold selection and the guard (fishertune.tune.smalldata)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fishertune.config import ConfigError
from fishertune.tune.smalldata import (
    TrainConfig,
    _lr_lambda,
    adapt_batchnorm,
    finetune_small,
    image_transform,
    resolve_train,
    stratified_folds,
)
from fishertune.tune.strategies import PRESETS, get_strategy
from fishertune.utils.settings import data_root


class Tiny(nn.Module):
    """conv-BN-ReLU-conv-BN-ReLU-pool-linear on 3x8x8 images; roles for the presets' rules."""

    ROLES = {"stem": ("conv1", "bn1"), "decoder": ("conv2", "bn2"), "head": ("linear",)}

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.linear = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.linear(x.mean((2, 3)))


def _data(n_per_class: int = 6, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = torch.rand(len(y), 3, 8, 8, generator=g) * 0.5
    x[:, 0] += 0.5 * (y == 0).float().view(-1, 1, 1)   # a learnable colour cue
    x[:, 1] += 0.5 * (y == 1).float().view(-1, 1, 1)
    return x.clamp(0, 1), y


def _model(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    m = Tiny()
    with torch.no_grad():  # non-trivial running statistics
        for bn in (m.bn1, m.bn2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


FAST = {"epochs": 2, "batch_size": 6, "selection": "fixed", "guard": False, "lr": 0.05, "augment": ["flip"]}


# --- frozen parameters stay bit-exact ----------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_frozen_parameters_never_change(name: str) -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _data()
    unl, _ = _data(seed=5)
    strat = get_strategy(name, {"train": {"steps_per_epoch": 2}, **(
        {"pseudo_label": {"batch_size": 8, "threshold": 0.0}} if PRESETS[name].get("pseudo_label") else {}),
        **({"anchor": {"fisher_images": 8}} if PRESETS[name].get("anchor") else {}),
        **({"entropy": {"batch_size": 8}} if PRESETS[name].get("entropy") else {})})
    fit = finetune_small(model, strat, (x, y), config=dict(FAST, weight_decay=0.01, optimizer="adamw"),
                         unlabelled=unl)
    rep = fit.report
    after = model.state_dict()
    trained = set(rep.params)
    changed_somewhere = False
    for k, v in after.items():
        leaf = k.rsplit(".", 1)[-1]
        if leaf in ("running_mean", "running_var", "num_batches_tracked"):
            if strat.bn_adapt is None:   # bn_mode "frozen": statistics never move
                assert torch.equal(v, before[k]), k
            continue
        if k not in trained:
            assert torch.equal(v, before[k]), f"{name}: frozen {k} changed"
        elif k in rep.masks:
            m = rep.masks[k]
            assert torch.equal(v[~m], before[k][~m]), f"{name}: masked entries of {k} changed"
            changed_somewhere |= not torch.equal(v[m], before[k][m])
        else:
            changed_somewhere |= not torch.equal(v, before[k])
    assert changed_somewhere == bool(trained), name


def test_bn_train_mode_moves_statistics_only_when_asked() -> None:
    x, y = _data()
    model = _model()
    before = model.bn1.running_mean.clone()
    finetune_small(model, "head_only", (x, y), config=dict(FAST, bn_mode="train"))
    assert not torch.equal(model.bn1.running_mean, before)


# --- BN adaptation -----------------------------------------------------------------------------------

def test_bn_adapt_touches_only_running_statistics_and_mixes() -> None:
    x, _ = _data(n_per_class=10)
    tf = image_transform([])
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    changed = adapt_batchnorm(model, x, tf, alpha=0.25, batch_size=7)
    assert set(changed) == {f"bn{i}.{s}" for i in (1, 2) for s in ("running_mean", "running_var",
                                                                    "num_batches_tracked")}
    for k, v in model.state_dict().items():
        if k in changed:
            continue
        assert torch.equal(v, before[k]), k
    assert not model.training and model.bn1.momentum == 0.1
    # by hand: target statistics of bn1's input over all images (batches normalised by themselves
    # only matter for bn2; bn1 sees the raw conv output)
    with torch.no_grad():
        h = model.conv1(tf(x, False, None))
        mean = h.mean((0, 2, 3))
        var = h.var((0, 2, 3), unbiased=True)
    torch.testing.assert_close(model.bn1.running_mean, 0.75 * before["bn1.running_mean"] + 0.25 * mean)
    torch.testing.assert_close(model.bn1.running_var, 0.75 * before["bn1.running_var"] + 0.25 * var,
                               rtol=1e-4, atol=1e-5)
    m0 = _model()
    adapt_batchnorm(m0, x, tf, alpha=0.0)
    assert torch.equal(m0.bn2.running_var, before["bn2.running_var"])
    with pytest.raises(ValueError, match="no BatchNorm"):
        adapt_batchnorm(nn.Linear(2, 2), torch.zeros(3, 2), lambda a, b, c: a)


def test_bn_adapt_strategy_is_label_free_and_guarded() -> None:
    x, y = _data()
    unl, _ = _data(n_per_class=10, seed=3)
    model = _model()
    fit = finetune_small(model, get_strategy("bn_adapt", {"bn_adapt": {"alpha": 1.0}}), (x, y),
                         unlabelled=unl, config={"guard": False})
    assert fit.selection == "label-free" and fit.report.trainable == 0 and not fit.kept_base
    assert fit.report.buffers_changed
    with pytest.raises(ValueError, match="bn_adapt from unlabelled images, but none given"):
        finetune_small(_model(), "bn_adapt", (x, y))


# --- the guard ---------------------------------------------------------------------------------------

def test_guard_keeps_the_pretrained_model_when_nothing_beats_it() -> None:
    """Labels are the model's own predictions: it is 100 % right, fine-tuning cannot beat that."""
    x, _ = _data(n_per_class=8)
    model = _model()
    with torch.no_grad():
        y = model(image_transform([])(x, False, None)).argmax(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    strat = get_strategy("full_low_lr", {"train": {"lr_grid": [0.5]}})
    fit = finetune_small(model, strat, (x, y), config={"epochs": 2, "batch_size": 8, "folds": 3,
                                                         "augment": ["noise:0.5"]})
    assert fit.kept_base and "guard kept the pretrained model" in fit.message
    assert fit.base_correct == len(y) and fit.n_scored == len(y)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # a bad label-free change is refused the same way
    fit = finetune_small(model, get_strategy("bn_adapt", {"bn_adapt": {"alpha": 1.0}}), (x, y),
                         unlabelled=torch.rand(20, 3, 8, 8) * 0.01)
    assert fit.kept_base or fit.chosen_correct > fit.base_correct


def test_guard_accepts_a_real_improvement_and_kfold_scores_each_example_once() -> None:
    x, y = _data(n_per_class=10)
    model = _model()
    with torch.no_grad():  # a head that predicts a constant class: 1/3 right
        model.linear.weight.zero_()
        model.linear.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    # the strategy's own recipe entries (here lr_grid) take precedence over the base config
    strat = get_strategy("head_only", {"train": {"lr_grid": [3.0]}})
    fit = finetune_small(model, strat, (x, y), config={"epochs": 8, "batch_size": 10, "folds": 3,
                                                         "lr_grid": [1e-9], "augment": [],
                                                         "optimizer": "adamw", "clip_grad": None})
    assert fit.base_correct == 10 and fit.n_scored == 30
    assert not fit.kept_base, fit.message
    assert fit.chosen_correct > fit.base_correct and "fine-tuned kept" in fit.message
    assert len(fit.curves["3"]) == 9 and fit.curves["3"][0] == 10   # epoch 0 = before training
    assert "resplit 3" in fit.curves and fit.epochs >= 1 and fit.lr == 3.0


def test_holdout_selection_with_patience() -> None:
    x, y = _data(n_per_class=10)
    model = _model()
    strat = get_strategy("head_only", {"train": {"lr_grid": [0.1]}})
    fit = finetune_small(model, strat, (x, y), config={"epochs": 6, "selection": "holdout", "holdout": 0.3,
                                                         "patience": 2, "augment": []})
    assert fit.selection == "holdout" and fit.n_scored == 10   # 1/round(1/0.3) = a third of 30
    assert len(fit.curves["0.1"]) <= 7


# --- recipe pieces -----------------------------------------------------------------------------------

def test_stratified_folds_are_disjoint_balanced_and_cover() -> None:
    y = torch.arange(4).repeat_interleave(5)
    folds = stratified_folds(y, 5, seed=3)
    allidx = torch.cat(folds)
    assert sorted(allidx.tolist()) == list(range(20))
    for f in folds:
        assert torch.bincount(y[f], minlength=4).tolist() == [1, 1, 1, 1]
    assert [f.tolist() for f in stratified_folds(y, 5, seed=3)] == [f.tolist() for f in folds]
    with pytest.raises(ValueError, match="5 folds need at least 5"):
        stratified_folds(torch.zeros(3), 5, 0)


def test_schedule_by_hand() -> None:
    f = _lr_lambda(total=10, warmup=2, schedule="cosine")
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == 1.0 and f(6) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)
    assert _lr_lambda(10, 0, "constant")(7) == 1.0
    assert f(4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 8)))


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="unknown key 'epoch'"):
        resolve_train({}, get_strategy("head_only", {"train": {"epoch": 3}}))
    with pytest.raises(ConfigError, match="unknown augmentation 'blur'"):
        resolve_train({"augment": ["blur"]}, get_strategy("head_only"))
    assert resolve_train(TrainConfig(epochs=3), get_strategy("head_only")).lr_grid == [0.003, 0.01, 0.03]
    with pytest.raises(ValueError, match="needs unlabelled inputs"):
        x, y = _data()
        finetune_small(_model(), "self_train", (x, y), config=FAST)


# --- real data: ResNet-20 on a handful of JPEG images -----------------------------------------------

def _vision() -> None:
    if not (data_root() / "vision" / "resnet20.safetensors").is_file():
        pytest.skip("vision data not under FISHERTUNE_DATA")


def test_resnet20_head_only_on_jpeg_images_runs_and_reports() -> None:
    _vision()
    from fishertune.zoo import load_cifar_jpeg, load_cifar_resnet

    x, y = load_cifar_jpeg("train5k", first_per_class=2)
    model = load_cifar_resnet(20)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit = finetune_small(model, get_strategy("head_only", {"train": {"lr_grid": [0.01]}}), (x, y),
                         config={"epochs": 1, "folds": 2, "guard_resplit": False})
    assert fit.report.trainable == 650 and fit.n_scored == 20
    for k, v in model.state_dict().items():
        if not k.startswith("linear."):
            assert torch.equal(v, before[k]), k
