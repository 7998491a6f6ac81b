"""FisherTuner end to end on a tiny two-domain model: config errors, groups, optimizer groups, the
Fisher functions against brute force, masks keep frozen entries bit-exact during tuning, log rows,
use_fishertune=False is plain training, EWC / online values, and a state_dict round trip resumes
identically."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from fishertune.config import ConfigError, validate
from fishertune.tune import (FisherTuneConfig, FisherTuner, Perturbation, batch_gradient_fisher, delta_at,
                             engine_fisher, resolve_groups)
from fishertune.fisher import DiagonalNaturalGradient
from fishertune.tune import EWCGradient, OnlineFisher, ewc_penalty
from fishertune.tune.perturb import FeatureShift
from fishertune.utils.readbacks import ReadBacks

GROUPS = {"shared": ["emb.*", "enc.*"], "specific": ["heads.*"]}


class TwoDomain(nn.Module):
    """Shared item embedding + encoder, one output head per domain."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.enc = nn.Linear(6, 8)
        self.heads = nn.ModuleList([nn.Linear(8, 4), nn.Linear(8, 4)])

    def forward(self, idx, dom):
        h = torch.tanh(self.enc(self.emb(idx)))
        out = torch.stack([head(h) for head in self.heads], 1)        # [B, 2, 4]
        return out[torch.arange(idx.shape[0]), dom]


def make_data(seed=0, n=96):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 20, (n,), generator=g)
    dom = torch.randint(0, 2, (n,), generator=g)
    y = (idx + 3 * dom) % 4
    return idx, dom, y


def batches(data, bs=16):
    idx, dom, y = data
    return [((idx[i:i + bs], dom[i:i + bs]), y[i:i + bs]) for i in range(0, len(y), bs)]


def loss_fn(model, batch):
    (idx, dom), y = batch
    return nn.functional.cross_entropy(model(idx, dom), y)


def make(cfg_kw=None, seed=0, perturbation=None, fisher="engine", log=None, total_epochs=8, dtype=None):
    torch.manual_seed(seed)
    model = TwoDomain()
    if dtype is not None:
        model = model.to(dtype)
    cfg = FisherTuneConfig(**{"fishertune_warmup": 2, "fim_update_freq": 2, "shared_lr": 0.05, "specific_lr": 0.1,
                              "shared_weight_decay": 0.01, "specific_weight_decay": 0.001, **(cfg_kw or {})})
    data = make_data()
    fn = engine_fisher("categorical") if fisher == "engine" else batch_gradient_fisher(loss_fn)
    tuner = FisherTuner(model, cfg, GROUPS, fn, lambda: batches(data, 32), perturbation=perturbation, seed=seed,
                        log=log, total_epochs=total_epochs)
    return model, tuner, data


def train(model, tuner, opt, data, epochs, start=0, check_frozen=False, differentiable=False, losses=None):
    rows = []
    for epoch in range(start, start + epochs):
        tuner.on_epoch_start(epoch)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        masks = tuner.mask.masks()
        order = torch.randperm(len(data[2]), generator=torch.Generator().manual_seed(100 + epoch))
        shuffled = tuple(t[order] for t in data)
        for b in batches(shuffled, 16):
            opt.zero_grad()
            loss = loss_fn(model, b) + tuner.penalty(differentiable=differentiable)
            if losses is not None:
                losses.append(float(loss.detach()))
            loss.backward()
            tuner.before_step(batch_size=16)
            opt.step()
            tuner.after_step()
        if check_frozen:
            for n, p in model.named_parameters():
                assert torch.equal(p.detach()[~masks[n]], before[n][~masks[n]]), (epoch, n)
        with torch.no_grad():
            v = float(loss_fn(model, ((data[0], data[1]), data[2])))
        rows.append(tuner.on_epoch_end(epoch, {"valid_loss": v}))
    return rows


# ------------------------------------------------------------------------------------------------ config
def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="shared_delta_min"):
        validate(FisherTuneConfig, {"shared_delta_min": 0.9, "shared_delta_max": 0.5})
    with pytest.raises(ConfigError, match="edge_dropout_rate"):
        validate(FisherTuneConfig, {"edge_dropout_rate": 1.0})
    with pytest.raises(ConfigError, match="specific_delta_max"):
        validate(FisherTuneConfig, {"specific_delta_max": 1.5})
    with pytest.raises(ConfigError, match="unknown key 'fim_update_frequency'"):
        validate(FisherTuneConfig, {"fim_update_frequency": 3})
    with pytest.raises(ConfigError, match="perturbation_type"):
        validate(FisherTuneConfig, {"perturbation_type": "dropout"})


def test_groups_must_cover_every_parameter_once():
    m = TwoDomain()
    with pytest.raises(ValueError, match=r"no group: \['heads.0.weight'"):
        resolve_groups(m, {"shared": ["emb.*", "enc.*"], "specific": ["heads.1.*"]})
    with pytest.raises(ValueError, match="several groups"):
        resolve_groups(m, {"shared": ["*"], "specific": ["heads.*"]})
    with pytest.raises(ValueError, match=r"\['specific'\] match no trainable"):
        resolve_groups(m, {"shared": ["*"], "specific": ["decoder.*"]})
    with pytest.raises(ValueError, match="unknown parameter group"):
        resolve_groups(m, {"shared": ["*"], "other": ["x"]})
    assert resolve_groups(m, GROUPS)["specific"] == ["heads.0.weight", "heads.0.bias", "heads.1.weight",
                                                     "heads.1.bias"]


def test_optimizer_groups_get_their_own_lr_and_weight_decay():
    model, tuner, data = make({"use_fishertune": False})
    opt = tuner.make_optimizer("sgd")
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in opt.param_groups] == [
        ("shared", 0.05, 0.01), ("specific", 0.1, 0.001)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    loss_fn(model, batches(data)[0]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        lr, wd = (0.05, 0.01) if n.startswith(("emb", "enc")) else (0.1, 0.001)
        torch.testing.assert_close(p.detach(), before[n] - lr * (grads[n] + wd * before[n]))
    with pytest.raises(ValueError, match="shared_lr"):
        tuner.make_optimizer("adam", lr=0.1)
    with pytest.raises(ValueError, match="unknown optimizer"):
        tuner.make_optimizer("lion")


def test_delta_schedule_endpoints():
    for shape in ("linear", "cosine"):
        assert delta_at(0, 10, 0.9, 0.3, shape) == 0.9
        assert delta_at(9, 10, 0.9, 0.3, shape) == 0.3
        assert delta_at(50, 10, 0.9, 0.3, shape) == 0.3
        vals = [delta_at(t, 10, 0.9, 0.3, shape) for t in range(10)]
        assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert delta_at(0, 1, 0.9, 0.3) == 0.3
    assert delta_at(2, 5, 1.0, 0.0, "linear") == pytest.approx(0.5)
    assert delta_at(2, 5, 1.0, 0.0, "cosine") == pytest.approx(0.5)
    assert delta_at(1, 5, 1.0, 0.0, "cosine") > delta_at(1, 5, 1.0, 0.0, "linear")


# ------------------------------------------------------------------------------------------------ Fisher fns
def _brute_per_sample(model, data):
    (idx, dom), y = data
    params = {n: p for n, p in model.named_parameters()}
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(y)):
        loss = nn.functional.cross_entropy(model(idx[i:i + 1], dom[i:i + 1]), y[i:i + 1])
        for (n, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
            if g is not None:
                acc[n] += g ** 2
    return {n: t / len(y) for n, t in acc.items()}


def test_engine_fisher_equals_brute_force():
    torch.manual_seed(0)
    model = TwoDomain().double()
    idx, dom, y = make_data(n=40)
    got = engine_fisher("categorical")(model, batches((idx, dom, y), 16))
    want = _brute_per_sample(model, ((idx, dom), y))
    for n in want:
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-9, atol=1e-12)


def test_engine_fisher_under_feature_shift_of_a_parametrised_layer():
    """The shift sits on `enc`, which owns parameters: its per-sample gradients must go through it."""
    torch.manual_seed(0)
    model = TwoDomain().double()
    idx, dom, y = make_data(n=24)
    p = FeatureShift(["enc"], 0.3, 0.2, random=False)
    with p.context(model):
        got = engine_fisher("categorical")(model, batches((idx, dom, y), 8))
        want = _brute_per_sample(model, ((idx, dom), y))
    for n in want:
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-9, atol=1e-12)


def test_batch_gradient_fisher_by_hand():
    torch.manual_seed(0)
    model = TwoDomain().double()
    bs = batches(make_data(n=32), 16)
    got = batch_gradient_fisher(loss_fn)(model, bs)
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for b in bs:
        grads = torch.autograd.grad(loss_fn(model, b), list(model.parameters()))
        for (n, _), g in zip(model.named_parameters(), grads):
            want[n] += 16 * g ** 2 / 2
    for n in want:
        torch.testing.assert_close(got[n], want[n])
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="yielded nothing"):
        batch_gradient_fisher(loss_fn)(model, [])


# ------------------------------------------------------------------------------------------------ end to end
def test_toy_end_to_end_rows_masks_and_log():
    lines = []
    model, tuner, data = make({"perturbation_type": "feature_shift", "perturbation_modules": ["enc"]},
                              log=lines.append)
    opt = tuner.make_optimizer("adam")
    with torch.no_grad():
        first_loss = float(loss_fn(model, ((data[0], data[1]), data[2])))
    rows = train(model, tuner, opt, data, 8, check_frozen=True)
    with torch.no_grad():
        last_loss = float(loss_fn(model, ((data[0], data[1]), data[2])))
    assert last_loss < first_loss
    assert [r["phase"] for r in rows] == ["warmup"] * 2 + ["tune"] * 6
    assert [r["fisher_updated"] for r in rows] == [False, False, True, False, True, False, True, False]
    for r in rows[:2]:
        assert r["ratio"]["all"] == 1.0 and r["threshold"] == {"shared": 0.0, "specific": 0.0}
    for t, r in enumerate(rows[2:]):
        for g, (hi, lo) in {"shared": (0.9, 0.5), "specific": (0.5, 0.1)}.items():
            assert r["threshold"][g] == pytest.approx(delta_at(t, 6, hi, lo))
            # rank importance: roughly the top (1 - delta) of the group trains (ties at zero can only lower it)
            assert r["ratio"][g] <= 1 - r["threshold"][g] + 0.02
        assert r["active_elements"]["all"] == sum(r["active_elements"][g] for g in ("shared", "specific"))
        assert 0 < r["ratio"]["all"] < 1
    assert rows[-1]["ratio"]["specific"] > rows[2]["ratio"]["specific"]       # progressive: more trains later
    tune_lines = [ln for ln in lines if ln.startswith("[FisherTune] Epoch")]
    assert len(tune_lines) == 8
    assert re.match(r"\[FisherTune\] Epoch 7: Threshold=0\.3000, Active params=\d+, Ratio=\d+\.\d\d%", tune_lines[-1])
    assert any("Fisher updated at epoch 2" in ln for ln in lines)
    summary = tuner.fisher_summary()
    assert set(summary) == {"shared", "specific"} and summary["shared"]["fisher_mean"] > 0
    assert summary["shared"]["drfim_extra_max"] > 0
    imp = tuner.importance()
    assert set(imp) == {n for n, _ in model.named_parameters()}
    assert all(float(t.min()) >= 0 and float(t.max()) <= 1 for t in imp.values())


def test_unperturbed_copy_gives_zero_extra_term_in_the_tuner():
    model, tuner, data = make({"perturbation_type": "combined"}, perturbation=Perturbation())
    opt = tuner.make_optimizer("adam")
    train(model, tuner, opt, data, 3)
    s = tuner.fisher_summary()
    for g in s:
        assert s[g]["drfim_extra_max"] == 0.0
        assert s[g]["drfim_mean"] == pytest.approx(1.0)        # DR = F / mean(F): mean 1


def test_use_fishertune_false_is_plain_training():
    model, tuner, data = make({"use_fishertune": False, "use_fisher_regularization": True,
                               "use_natural_gradient": True})
    opt = tuner.make_optimizer("adam")
    rows = train(model, tuner, opt, data, 4)
    assert all(r["phase"] == "off" and r["ratio"]["all"] == 1.0 for r in rows)
    torch.manual_seed(0)
    ref = TwoDomain()
    ref_opt = torch.optim.Adam([{"params": list(ref.emb.parameters()) + list(ref.enc.parameters()), "lr": 0.05,
                                 "weight_decay": 0.01},
                                {"params": list(ref.heads.parameters()), "lr": 0.1, "weight_decay": 0.001}])
    for epoch in range(4):
        order = torch.randperm(len(data[2]), generator=torch.Generator().manual_seed(100 + epoch))
        for b in batches(tuple(t[order] for t in data), 16):
            ref_opt.zero_grad()
            loss_fn(ref, b).backward()
            ref_opt.step()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n


def test_ewc_penalty_and_online_fisher_values():
    model, tuner, data = make({"use_fisher_regularization": True, "fisher_reg_strength": 3.0,
                               "fim_method": "online", "fim_ema_decay": 0.5})
    opt = tuner.make_optimizer("sgd")
    assert float(tuner.penalty()) == 0.0
    # online EMA by hand over the first two steps
    sq = []
    for b in batches(data, 16)[:2]:
        opt.zero_grad()
        loss_fn(model, b).backward()
        sq.append({n: 16 * p.grad.detach() ** 2 for n, p in model.named_parameters()})
        tuner.before_step(batch_size=16)
        opt.step()
        tuner.after_step()
    got = tuner.online.get()
    for n in got:
        want = (0.5 * 0.5 * sq[0][n] + 0.5 * sq[1][n]) / (1 - 0.25)
        torch.testing.assert_close(got[n], want)
    train(model, tuner, opt, data, 3)
    F, anchor = tuner.anchor_fisher, tuner.anchor
    want = 1.5 * sum(float((F[n] * (p.detach() - anchor[n]) ** 2).sum()) for n, p in model.named_parameters())
    assert float(tuner.penalty().detach()) == pytest.approx(want)
    assert want > 0


def test_zero_fisher_and_missing_batches_are_clear_errors():
    model = TwoDomain()
    cfg = FisherTuneConfig(fishertune_warmup=0)
    tuner = FisherTuner(model, cfg, GROUPS, lambda m, b: {n: torch.zeros_like(p) for n, p in m.named_parameters()},
                        lambda: [], log=None)
    with pytest.raises(ValueError, match="zero for every parameter.*warm-up"):
        tuner.on_epoch_start(0)
    tuner = FisherTuner(model, cfg, GROUPS, engine_fisher("categorical"), lambda: [], log=None)
    with pytest.raises(ValueError, match="FisherTune: estimating the Fisher failed.*batches"):
        tuner.on_epoch_start(0)
    with pytest.raises(ValueError, match="perturbation_modules"):
        FisherTuner(model, FisherTuneConfig(perturbation_type="noise"), GROUPS, engine_fisher("categorical"),
                    lambda: [], log=None)
    with pytest.raises(ValueError, match="fishertune.recsys"):
        FisherTuner(model, FisherTuneConfig(perturbation_type="edge_dropout"), GROUPS, engine_fisher("categorical"),
                    lambda: [], log=None)


def test_adaptive_scheduler_moves_thresholds():
    model, tuner, data = make({"use_adaptive_scheduler": True, "scheduler_adaptation_rate": 0.1})
    tuner.on_epoch_start(0)
    tuner.on_epoch_start(2)
    tuner.phase = "tune"
    tuner.on_epoch_end(2, {"valid_loss": 1.0})      # reference
    tuner.on_epoch_end(3, {"valid_loss": 0.9})      # improved: -rate
    assert tuner.adaptive.offset == pytest.approx(-0.1)
    tuner.on_epoch_end(4, {"valid_loss": 0.95})     # stalled: +rate
    tuner.on_epoch_end(5, {"valid_loss": 0.95})
    assert tuner.adaptive.offset == pytest.approx(0.1)
    tuner.on_epoch_start(4)
    assert tuner.thresholds["shared"] == pytest.approx(delta_at(2, 6, 0.9, 0.5) + 0.1)


# ------------------------------------------------------------------------------------------------ resume
RESUME_CONFIGS = {
    "features": {"perturbation_type": "feature_shift", "perturbation_modules": ["enc"], "use_variational": True,
                 "use_adaptive_vi": True, "variational_tau": 0.05, "use_fisher_regularization": True,
                 "use_natural_gradient": True, "use_adaptive_scheduler": True},
    "kfac_online": {"use_natural_gradient": True, "natural_gradient": "kfac", "kfac_update_freq": 2,
                    "fim_method": "online", "perturbation_type": "noise", "perturbation_modules": ["enc"]},
}


@pytest.mark.parametrize("name", list(RESUME_CONFIGS))
def test_state_dict_round_trip_resumes_identically(name, tmp_path):
    kw = RESUME_CONFIGS[name]
    model, tuner, data = make(kw)
    opt = tuner.make_optimizer("adam")
    full = train(model, tuner, opt, data, 7)

    model2, tuner2, _ = make(kw)
    opt2 = tuner2.make_optimizer("adam")
    train(model2, tuner2, opt2, data, 4)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict(), "tuner": tuner2.state_dict()}, path)
    model3, tuner3, _ = make(kw, seed=1)                # different init: everything must come from the checkpoint
    opt3 = tuner3.make_optimizer("adam")
    ckpt = torch.load(path, weights_only=False)
    model3.load_state_dict(ckpt["model"])
    opt3.load_state_dict(ckpt["opt"])
    tuner3.load_state_dict(ckpt["tuner"])
    tuner3.seed = 0
    rest = train(model3, tuner3, opt3, data, 3, start=4)
    for (n, p), (_, q) in zip(model.named_parameters(), model3.named_parameters()):
        assert torch.equal(p, q), n
    assert [r["ratio"] for r in rest] == [r["ratio"] for r in full[4:]]
    assert [r["threshold"] for r in rest] == [r["threshold"] for r in full[4:]]


# ------------------------------------------------------------------------------- fast paths equal old ones
def _ewc_setup(dtype=torch.float32):
    torch.manual_seed(3)
    model = TwoDomain().to(dtype)
    params = dict(model.named_parameters())
    fisher = {n: torch.rand(p.shape, dtype=dtype) ** 2 for n, p in params.items()}
    anchor = {n: (p.detach() + 0.3 * torch.randn_like(p)) for n, p in params.items()}
    return model, params, fisher, anchor


@pytest.mark.parametrize("cpu_buffers", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ewc_gradient_equals_autograd_of_the_penalty(dtype, cpu_buffers):
    model, params, fisher, anchor = _ewc_setup(dtype)
    b = batches(make_data(), 16)[0]
    # old path: the penalty through autograd
    model.zero_grad(set_to_none=True)
    (loss_fn(model, b) + ewc_penalty(params, fisher, anchor, 2.5)).backward()
    want = {n: p.grad.clone() for n, p in params.items()}
    want_value = float(ewc_penalty(params, fisher, anchor, 2.5).detach())
    # new path: loss only, then the foreach gradient; value first (its terms are reused by add_to_grads)
    ewc = EWCGradient(params, fisher, anchor, 2.5)
    if not cpu_buffers:
        ewc._buffers = None                # the GPU path: foreach ops into fresh tensors
    model.zero_grad(set_to_none=True)
    loss_fn(model, b).backward()
    value = ewc.value()
    assert not value.requires_grad and value.dtype == dtype
    assert float(value) == pytest.approx(want_value, rel=1e-6)
    ewc.add_to_grads()
    tol = {"rtol": 1e-6, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-13, "atol": 1e-15}
    for n, p in params.items():
        torch.testing.assert_close(p.grad, want[n], **tol)
    # without value() first: the same gradient
    model.zero_grad(set_to_none=True)
    loss_fn(model, b).backward()
    ewc.add_to_grads()
    for n, p in params.items():
        torch.testing.assert_close(p.grad, want[n], **tol)


def test_ewc_gradient_missing_and_sparse_grads_and_stale_cache():
    model, params, fisher, anchor = _ewc_setup()
    model.emb = nn.Embedding(20, 6, sparse=True)
    with torch.no_grad():
        model.emb.weight.copy_(params["emb.weight"])
    params = dict(model.named_parameters())
    b = batches(make_data(), 16)[0]

    def only_head0(m, batch):              # heads.1 gets no gradient at all (grad None)
        (idx, dom), y = batch
        return nn.functional.cross_entropy(m.heads[0](torch.tanh(m.enc(m.emb(idx)))), y)

    model.zero_grad(set_to_none=True)
    (only_head0(model, b) + ewc_penalty(params, fisher, anchor, 1.5)).backward()
    want = {n: p.grad.to_dense().clone() for n, p in params.items()}
    model.zero_grad(set_to_none=True)
    only_head0(model, b).backward()
    assert params["emb.weight"].grad.is_sparse and params["heads.1.weight"].grad is None
    ewc = EWCGradient(params, fisher, anchor, 1.5)
    ewc.add_to_grads()
    for n, p in params.items():
        assert not p.grad.is_sparse
        torch.testing.assert_close(p.grad, want[n], rtol=1e-6, atol=1e-7)
    # value() terms are dropped when a parameter changes in place; a gradient made from them is a copy
    grads = {n: p.grad.clone() for n, p in params.items()}
    v0 = float(ewc.value())
    with torch.no_grad():
        params["enc.bias"].add_(1.0)
        params["heads.1.weight"].add_(1.0)
    assert float(ewc.value()) == pytest.approx(float(ewc_penalty(params, fisher, anchor, 1.5).detach()), rel=1e-6)
    assert float(ewc.value()) != v0
    for n, p in params.items():
        assert torch.equal(p.grad, grads[n]), n


ALL_FEATURES = {"perturbation_type": "feature_shift", "perturbation_modules": ["enc"], "use_variational": True,
                "use_adaptive_vi": True, "variational_tau": 0.05, "use_natural_gradient": True,
                "use_fisher_regularization": True, "fisher_reg_strength": 2.0, "use_adaptive_scheduler": True}


@pytest.mark.parametrize("opt_name,extra", [("adam", {}), ("sgd", {"fim_method": "online"})])
def test_tuner_foreach_ewc_equals_the_autograd_penalty_path(opt_name, extra):
    """all features on: the tuner's foreach EWC gradient (default) trains the same model as the old path
    (penalty back-propagated through autograd), in float64 so that rounding cannot flip a mask."""
    runs = []
    for differentiable in (True, False):
        model, tuner, data = make({**ALL_FEATURES, **extra}, dtype=torch.float64)
        opt = tuner.make_optimizer(opt_name)
        losses = []
        rows = train(model, tuner, opt, data, 6, differentiable=differentiable, losses=losses)
        runs.append((model, rows, losses))
    (m_old, rows_old, l_old), (m_new, rows_new, l_new) = runs
    assert [r["ratio"] for r in rows_new] == [r["ratio"] for r in rows_old]
    torch.testing.assert_close(torch.tensor(l_new), torch.tensor(l_old), rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        assert l_new[-1] != pytest.approx(float(loss_fn(m_new, batches(make_data(), 16)[0])))  # penalty in the loss
    for (n, p), (_, q) in zip(m_new.named_parameters(), m_old.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=n)


def test_fused_diagonal_natural_gradient_is_bit_identical():
    model, tuner, data = make({"use_natural_gradient": True, "perturbation_type": "noise",
                               "perturbation_modules": ["enc"], "natural_gradient_precondition_decay": False})
    opt = tuner.make_optimizer("sgd")
    train(model, tuner, opt, data, 3)
    assert tuner.dng is not None
    ref = DiagonalNaturalGradient(model, torch.optim.SGD(model.parameters(), lr=0.0), tuner.fisher,
                                  damping=tuner.config.fisher_damping)
    for b in batches(make_data(seed=5), 16)[:2]:
        model.zero_grad(set_to_none=True)
        loss_fn(model, b).backward()
        model.heads[1].bias.grad = None                  # a parameter without gradient is skipped by both
        saved = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
        tuner._precondition()
        got = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.grad = None if saved[n] is None else saved[n].clone()
        ref.step()                                       # the previous per-parameter implementation
        for n, p in model.named_parameters():
            assert (got[n] is None) == (p.grad is None), n
            if p.grad is not None:
                assert torch.equal(got[n], p.grad), n
                assert not torch.equal(got[n], saved[n]), n


def test_online_fisher_foreach_update_is_bit_identical():
    torch.manual_seed(4)
    model = TwoDomain()
    params = dict(model.named_parameters())
    online = OnlineFisher(params, 0.9)
    ref = {n: torch.zeros_like(p) for n, p in params.items()}
    for i, b in enumerate(batches(make_data(), 16)[:4]):
        model.zero_grad(set_to_none=True)
        loss_fn(model, b).backward()
        if i == 2:
            model.heads[0].weight.grad = None            # the per-parameter fallback path
        online.update(16.0)
        for n, p in params.items():                      # the previous implementation
            if p.grad is None:
                ref[n].mul_(0.9)
            else:
                ref[n].mul_(0.9).addcmul_(p.grad, p.grad, value=(1 - 0.9) * 16.0)
    for n in params:
        assert torch.equal(online.m[n], ref[n]), n


@pytest.mark.parametrize("rescale", [True, False])
def test_natural_gradient_rescales_the_optimizers_moments_at_each_fisher_update(rescale):
    """First update: moments times 1/(F+d) (and its square); later ones: times (F_old+d)/(F_new+d)."""
    model, tuner, data = make({"use_natural_gradient": True, "perturbation_type": "noise",
                               "perturbation_modules": ["enc"], "natural_gradient_rescale_moments": rescale})
    opt = tuner.make_optimizer("adam")
    d = tuner.config.fisher_damping
    train(model, tuner, opt, data, 2)                       # warm-up: no preconditioner yet
    params = dict(model.named_parameters())
    for epoch in (2, 4):                                    # Fisher updates (fim_update_freq 2)
        old_f = None if tuner.fisher is None else {n: f.clone() for n, f in tuner.fisher.items()}
        before = {n: (opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone())
                  for n, p in params.items()}
        tuner.on_epoch_start(epoch)
        for n, p in params.items():
            r = 1 / (tuner.fisher[n] + d) if old_f is None else (old_f[n] + d) / (tuner.fisher[n] + d)
            if not rescale:
                r = torch.ones_like(r)
            torch.testing.assert_close(opt.state[p]["exp_avg"], before[n][0] * r)
            torch.testing.assert_close(opt.state[p]["exp_avg_sq"], before[n][1] * r ** 2)
            assert rescale == bool((r != 1).any()), n
        train(model, tuner, opt, data, 2, start=epoch)      # its on_epoch_start(epoch) estimates nothing new


@pytest.mark.parametrize("opt_name", ["sgd", "adam", "adamw"])
def test_precondition_decay_gives_the_natural_gradient_of_the_regularised_loss(opt_name):
    """With natural_gradient_precondition_decay, gradient + the optimizer's L2 term = (g + wd theta) / (F + d);
    AdamW's decoupled decay is left alone; without the option only g is preconditioned."""
    for on in (True, False):
        model, tuner, data = make({"use_natural_gradient": True, "perturbation_type": "noise",
                                   "perturbation_modules": ["enc"], "natural_gradient_precondition_decay": on},
                                  fisher="batch")
        opt = tuner.make_optimizer(opt_name)
        train(model, tuner, opt, data, 3)
        wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
        model.zero_grad(set_to_none=True)
        loss_fn(model, batches(make_data(seed=5), 16)[0]).backward()
        raw = {n: p.grad.clone() for n, p in model.named_parameters()}
        tuner._precondition()
        for n, p in model.named_parameters():
            D = tuner.fisher[n] + tuner.config.fisher_damping
            w = wd[id(p)]
            if opt_name == "adamw":           # decoupled: nothing to add
                torch.testing.assert_close(p.grad, raw[n] / D, msg=n)
            elif on:
                torch.testing.assert_close(p.grad + w * p.detach(), (raw[n] + w * p.detach()) / D, msg=n)
            else:
                torch.testing.assert_close(p.grad, raw[n] / D, msg=n)
        assert all(w > 0 for w in wd.values())


def test_fisher_update_read_backs_do_not_grow_with_the_number_of_parameters():
    class Deeper(TwoDomain):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))

    counts = []
    for cls in (TwoDomain, Deeper):
        torch.manual_seed(0)
        model = cls()
        data = make_data()
        cfg = FisherTuneConfig(fishertune_warmup=0, perturbation_type="feature_shift", perturbation_modules=["enc"])
        tuner = FisherTuner(model, cfg, GROUPS, engine_fisher("categorical"), lambda: batches(data, 32))
        with ReadBacks() as reads:
            tuner.on_epoch_start(0)
        assert tuner.update_count == 1
        # FisherTune's own reads, not the Fisher engine's (fishertune/fisher/)
        counts.append(sum(n for line, n in reads.lines.items() if not line.startswith("fishertune/fisher/")))
    assert sum(1 for _ in Deeper().parameters()) > sum(1 for _ in TwoDomain().parameters()) + 3
    assert counts[0] == counts[1] > 0, counts
