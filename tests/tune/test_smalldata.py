"""Small-data training, BN adaptation, k-fold selection and the guard (fishertune.tune.smalldata)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fishertune.config import ConfigError
from fishertune.tune.smalldata import (
    InputNoise,
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


# --- FisherTune inside finetune_small ----------------------------------------------------------------

FT_FAST = {"fishertune_warmup": 1, "fim_update_freq": 2}


def _fishertune(train: dict | None = None, **ft) -> object:
    return get_strategy("fishertune", {"fishertune": dict(FT_FAST, **ft), "train": dict(train or {})})


def _check_frozen_exact(model: nn.Module, before: dict, rep) -> bool:
    """Entries never selected are bit-exact; returns whether any selected entry changed."""
    changed = False
    params = dict(model.named_parameters())
    for k, v in model.state_dict().items():
        if k not in params:
            assert torch.equal(v, before[k]), k          # BN statistics (bn_mode frozen)
        elif k not in rep.params:
            assert torch.equal(v, before[k]), f"never selected {k} changed"
        elif k in rep.masks:
            m = rep.masks[k]
            assert torch.equal(v[~m], before[k][~m]), f"never selected entries of {k} changed"
            changed |= not torch.equal(v[m], before[k][m])
        else:
            changed |= not torch.equal(v, before[k])
    return changed


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fishertune_never_selected_entries_stay_bit_exact(optimizer: str) -> None:
    x, y = _data(n_per_class=8)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # weight decay and momentum / Adam moments built up in the warm-up must not leak into frozen entries
    fit = finetune_small(model, _fishertune(shared_delta_max=0.8, shared_delta_min=0.6),
                         (x, y), config=dict(FAST, epochs=4, lr=0.05, weight_decay=0.01, optimizer=optimizer))
    rep = fit.report
    assert _check_frozen_exact(model, before, rep)
    assert rep.masks, "the thresholds should leave some body parameters trained in part"
    assert 0 < rep.trainable < rep.total
    assert rep.trainable == sum(a for a, _ in rep.per_module.values())
    assert rep.per_role["head"] == (6 * 3 + 3, 6 * 3 + 3) or "linear.weight" in rep.masks
    # at 0.6-0.8 of the body frozen by rank, at most ~40 % of the body can ever have trained
    body = [n for n, _ in model.named_parameters() if not n.startswith("linear.")]
    body_total = sum(p.numel() for n, p in model.named_parameters() if n in body)
    body_sel = sum(int(rep.masks[n].sum()) if n in rep.masks else (dict(model.named_parameters())[n].numel()
                                                                    if n in rep.params else 0) for n in body)
    assert body_sel < 0.6 * body_total


def test_fishertune_warmup_trains_only_the_head() -> None:
    x, y = _data(n_per_class=8)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit = finetune_small(model, _fishertune(fishertune_warmup=3), (x, y), config=dict(FAST, epochs=3))
    assert sorted(fit.report.params) == ["linear.bias", "linear.weight"] and not fit.report.masks
    assert _check_frozen_exact(model, before, fit.report)
    assert fit.report.trainable == 6 * 3 + 3


def test_fishertune_kfold_guard_and_delta_reload(tmp_path) -> None:
    from fishertune.tune.delta import load_delta, save_delta

    x, y = _data(n_per_class=10)
    model = _model()
    with torch.no_grad():  # a head that predicts a constant class: 1/3 right, room to improve
        model.linear.weight.zero_()
        model.linear.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    strat = _fishertune({"lr_grid": [0.03, 0.3]})
    fit = finetune_small(model, strat, (x, y), config={"epochs": 4, "batch_size": 10, "folds": 3, "augment": []})
    assert fit.selection == "kfold" and fit.n_scored == 30 and fit.base_correct == 10
    assert len(fit.curves["0.03"]) == len(fit.curves["0.3"]) == 5     # epochs 0..4 per lr of the grid
    assert not fit.kept_base and "fine-tuned kept" in fit.message, fit.message
    assert f"resplit {fit.lr:g}" in fit.curves and fit.epochs >= 1
    assert _check_frozen_exact(model, base, fit.report)
    always = [n for n in fit.report.params if n not in fit.report.masks]   # as the comparison runner does
    save_delta(tmp_path / "ft.safetensors", model, base, strat, always=always)
    fresh = _model()
    fresh.load_state_dict(base)
    info = load_delta(tmp_path / "ft.safetensors", fresh)
    assert info["strategy"]["fishertune"]["fishertune_warmup"] == 1
    tf = image_transform([])
    with torch.no_grad():
        assert torch.equal(fresh(tf(x, False, None)), model(tf(x, False, None)))
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_fishertune_guard_keeps_the_pretrained_model() -> None:
    x, _ = _data(n_per_class=8)
    model = _model()
    with torch.no_grad():
        y = model(image_transform([])(x, False, None)).argmax(1)   # the model is 100 % right already
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit = finetune_small(model, _fishertune({"lr_grid": [0.5]}), (x, y),
                         config={"epochs": 2, "batch_size": 8, "folds": 3, "augment": ["noise:0.5"]})
    assert fit.kept_base and "guard kept the pretrained model" in fit.message
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("fim", [{"fim_method": "batch"}, {"fim_method": "online"},
                                 {"perturbation_type": "noise", "perturbation_noise_std": 0.3},
                                 {"perturbation_type": "feature_shift", "perturbation_modules": ["conv2"]},
                                 {"use_fisher_regularization": True, "use_natural_gradient": True},
                                 {"use_adaptive_scheduler": True, "scheduler_metric": "train_loss"},
                                 {"use_fishertune": False}])
def test_fishertune_options_run(fim: dict) -> None:
    x, y = _data(n_per_class=6)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit = finetune_small(model, _fishertune(**fim), (x, y), config=dict(FAST, epochs=3))
    assert _check_frozen_exact(model, before, fit.report)
    if fim.get("use_fishertune") is False:    # plain training of the rules' parameters
        assert fit.report.trainable == fit.report.total


def test_fishertune_through_the_comparison_runner(tmp_path, monkeypatch) -> None:
    """`fishertune: {}` in a finetune config: k-fold cells, the summary row and a delta that reloads to
    the cell's test accuracy."""
    from fishertune.tune import finetune as ft
    from fishertune.tune.delta import load_delta
    from fishertune.zoo import disjoint_draws

    x, y = _data(n_per_class=12, seed=0)
    tx, ty = _data(n_per_class=10, seed=1)

    def task(data, device):
        return ft.Task("tiny", _model(), (x * 255).to(torch.uint8), y, (tx * 255).to(torch.uint8), ty,
                       lambda aug: image_transform(aug), lambda seeds: disjoint_draws(y, data.k, seeds))

    monkeypatch.setattr(ft, "load_task", task)
    cfg = ft.FinetuneConfig.model_validate({
        "data": {"k": 6, "draws": [0]}, "device": "cpu",
        "train": {"epochs": 3, "batch_size": 6, "folds": 3, "augment": ["flip"], "guard": False},
        "strategies": {"fishertune": {"fishertune": FT_FAST, "train": {"lr_grid": [0.1]}}}})
    out = tmp_path / "out"
    summary = ft.run_comparison(cfg, out, log=lambda s: None)
    row = next(r for r in summary["rows"] if r["strategy"] == "fishertune")
    cell = __import__("json").loads((out / "cells" / "fishertune__draw0.json").read_text())
    assert row["draws"] == 1 and cell["selection"] == "kfold" and 0 < cell["trainable"] < cell["total"]
    model = _model()
    load_delta(out / "deltas" / "fishertune__draw0.safetensors", model)
    assert ft._accuracy(model, (tx * 255).to(torch.uint8), ty, image_transform([])) == cell["test_acc"]


def test_input_noise_perturbation() -> None:
    p = InputNoise(0.5)
    assert p.magnitude() == (0.0, 0.5)
    batch = ((torch.zeros(4, 3, 2, 2),), torch.zeros(4, dtype=torch.long))
    a = p.batch(batch, torch.Generator().manual_seed(1))
    b = p.batch(batch, torch.Generator().manual_seed(1))
    assert torch.equal(a[0][0], b[0][0]) and a[0][0].std() == pytest.approx(0.5, rel=0.3)
    assert torch.equal(a[1], batch[1]) and torch.equal(batch[0][0], torch.zeros(4, 3, 2, 2))
    with pytest.raises(ValueError, match="perturbation_noise_std"):
        InputNoise(-1.0)
    with pytest.raises(ValueError, match="token inputs name modules"):
        p.batch(({"input_ids": torch.zeros(2, 3, dtype=torch.long)}, torch.zeros(2)), torch.Generator())


def test_fishertune_config_errors_are_clear() -> None:
    with pytest.raises(ConfigError, match="unknown key 'perturbation_typ'"):
        get_strategy("fishertune", {"fishertune": {"perturbation_typ": "noise"}})
    with pytest.raises(ConfigError, match="shared_delta_min"):
        get_strategy("fishertune", {"fishertune": {"shared_delta_min": 1.5}})
    with pytest.raises(ConfigError, match="'shared_lr' is set by the small-data recipe: use train.lr"):
        get_strategy("fishertune", {"fishertune": {"shared_lr": 0.1}})
    with pytest.raises(ConfigError, match="recommender perturbation"):
        get_strategy("fishertune", {"fishertune": {"perturbation_type": "edge_dropout"}})
    with pytest.raises(ConfigError, match="scheduler_metric: train_loss"):
        get_strategy("fishertune", {"fishertune": {"use_adaptive_scheduler": True}})
    # a module pattern that matches nothing: refused before the warm-up (10 warm-up epochs, none run)
    with pytest.raises(ValueError, match=r"perturbation_modules: module pattern\(s\) \['nope'\] match no module"):
        finetune_small(_model(), _fishertune(fishertune_warmup=10, perturbation_type="feature_shift",
                                             perturbation_modules=["nope"]), _data(), config=dict(FAST, epochs=12))
    # input noise needs float inputs: refused before any training on token inputs
    class Tok(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(5, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.emb(input_ids).mean(1))

    ids = {"input_ids": torch.randint(0, 5, (12, 3), generator=torch.Generator().manual_seed(0))}
    with pytest.raises(ValueError, match="token inputs name modules"):
        finetune_small(Tok(), _fishertune(perturbation_type="noise"), (ids, torch.arange(12) % 2),
                       config=dict(FAST, augment=[]))


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
