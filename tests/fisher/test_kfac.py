"""K-FAC: equals the exact Fisher block where its assumptions hold; preconditioner consistency."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fishertune.fisher import diagonal_fisher, get_likelihood
from fishertune.fisher.kfac import DiagonalNaturalGradient, KFACOptimizer, kfac_factors


def exact_block(layer, x, y, lik):
    """E[vec(g) vec(g)^T] of [W, b] (row-major, bias last column) by a loop over samples."""
    rows = []
    for i in range(y.shape[0]):
        loss = lik.nll(layer(x[i:i + 1]), y[i:i + 1])[0].sum()
        gw, gb = torch.autograd.grad(loss, [layer.weight, layer.bias])
        rows.append(torch.cat([gw, gb[:, None]], 1).reshape(-1))
    G = torch.stack(rows)
    return G.t() @ G / y.shape[0]


def test_kfac_equals_exact_block_for_identical_inputs():
    layer = nn.Linear(3, 4)
    x = torch.randn(1, 3).repeat(7, 1)  # deterministic (identical) inputs, different targets
    y = torch.randint(0, 4, (7,))
    blocks = kfac_factors(layer, [(x, y)], progress=False)
    torch.testing.assert_close(blocks[""].dense(), exact_block(layer, x, y, get_likelihood("categorical")))


def test_kfac_single_sample_and_differs_otherwise():
    layer = nn.Linear(3, 2)
    x, y = torch.randn(1, 3), torch.tensor([1])
    b = kfac_factors(layer, [(x, y)], progress=False)[""]
    torch.testing.assert_close(b.dense(), exact_block(layer, x, y, get_likelihood("categorical")))
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    b = kfac_factors(layer, [(x, y)], progress=False)[""]
    assert not torch.allclose(b.dense(), exact_block(layer, x, y, get_likelihood("categorical")))


def test_kfac_conv_factor_shapes_and_true_kind():
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 16, 4))
    x, y = torch.randn(5, 2, 4, 4), torch.randint(0, 4, (5,))
    blocks = kfac_factors(m, [(x, y)], kind="true", n_samples=2, generator=torch.Generator().manual_seed(0),
                          progress=False)
    assert blocks["0"].A.shape == (2 * 9 + 1, 2 * 9 + 1) and blocks["0"].G.shape == (3, 3)
    assert blocks["2"].A.shape == (49, 49)
    for b in blocks.values():
        assert torch.allclose(b.A, b.A.t()) and torch.linalg.eigvalsh(b.G).min() > -1e-10


def test_kfac_diag_matches_diagonal_fisher_when_exact():
    layer = nn.Linear(3, 4)
    x = torch.randn(1, 3).repeat(5, 1)
    y = torch.randint(0, 4, (5,))
    b = kfac_factors(layer, [(x, y)], progress=False)[""]
    diag = diagonal_fisher(layer, [(x, y)], progress=False)
    d = b.dense().diagonal().reshape(4, 4)
    torch.testing.assert_close(d[:, :3], diag["weight"].double())
    torch.testing.assert_close(d[:, 3], diag["bias"].double())


def test_preconditioner_matches_dense_solve():
    layer = nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    b = kfac_factors(layer, [(x, y)], progress=False)[""]
    A_inv, G_inv = b.inverses(1e-2)
    gw, gb = torch.randn(2, 3), torch.randn(2)
    w, bb = b.precondition(gw, gb, A_inv, G_inv)
    p = b.pi()
    s = 1e-1
    dense = torch.kron(b.G + s / p * torch.eye(2), b.A + p * s * torch.eye(4))
    want = torch.linalg.solve(dense, torch.cat([gw, gb[:, None]], 1).reshape(-1)).reshape(2, 4)
    torch.testing.assert_close(torch.cat([w, bb[:, None]], 1), want)


def test_kfac_optimizer_preconditions_and_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    opt = KFACOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), damping=1e-2, update_freq=2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        raw = model[2].weight.grad.clone()
        opt.step()
        losses.append(float(loss))
    assert set(opt.blocks) == {"0", "2"} and opt.steps == 30
    assert losses[-1] < losses[0] * 0.8
    assert not torch.allclose(raw, model[2].weight.grad)  # the gradient was preconditioned
    opt.remove()


def test_diagonal_natural_gradient():
    model = nn.Linear(3, 2)
    fisher = {"weight": torch.full((2, 3), 3.0), "bias": torch.ones(2)}
    opt = DiagonalNaturalGradient(model, torch.optim.SGD(model.parameters(), lr=1.0), fisher, damping=1.0)
    before = model.weight.detach().clone()
    model.weight.grad = torch.full((2, 3), 8.0)
    model.bias.grad = torch.zeros(2)
    opt.step()
    torch.testing.assert_close(model.weight.detach(), before - 2.0)
    with pytest.raises(ValueError, match="shape"):
        opt.set_fisher({"weight": torch.ones(3, 2)})


@pytest.mark.parametrize("name", ["adam", "adamw", "rmsprop", "adagrad"])
def test_rescale_moments_equals_preconditioning_from_the_start(name):
    """Preconditioning switched on mid-run with the moments rescaled follows the run preconditioned from
    the first step (these optimizers' updates are invariant to a constant per-entry gradient scale, up to
    eps); switched on without the rescale it does not."""
    from fishertune.fisher import rescale_moments

    make = {"adam": lambda ps: torch.optim.Adam(ps, lr=0.01, eps=1e-30),
            "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, eps=1e-30, weight_decay=0.0),
            "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01, eps=1e-30),
            "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.01, eps=1e-30)}[name]
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(6, generator=g, dtype=torch.float64) for _ in range(12)]
    P = torch.rand(6, generator=g, dtype=torch.float64) * 1e3 + 1.0     # a jump of up to 1000x, as 1/(F+d)
    start = torch.randn(6, generator=g, dtype=torch.float64)
    runs = {}
    for mode in ("always", "rescaled", "plain"):
        p = nn.Parameter(start.clone())
        opt = make([p])
        for t, gr in enumerate(grads):
            if t == 6 and mode == "rescaled":
                assert rescale_moments(opt, {p: P}) == 1
            p.grad = gr * P if (mode == "always" or t >= 6) else gr.clone()
            opt.step()
        runs[mode] = p.detach()
    torch.testing.assert_close(runs["rescaled"], runs["always"], rtol=1e-9, atol=1e-12)
    assert (runs["plain"] - runs["always"]).abs().max() > 1e-3


def test_rescale_moments_scales_sgd_momentum_by_the_ratio():
    """SGD is not scale-invariant: its momentum buffer is simply multiplied by the ratio."""
    from fishertune.fisher import rescale_moments

    p = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    opt.step()
    buf = opt.state[p]["momentum_buffer"].clone()
    q = nn.Parameter(torch.zeros(3))               # no state yet: nothing to rescale
    assert rescale_moments(opt, {p: torch.tensor([2.0, 0.5, 1.0]), q: torch.ones(3)}) == 1
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], buf * torch.tensor([2.0, 0.5, 1.0]))


def _fixed_kfac(model, opt, **kw):
    """A K-FAC wrapper whose factors of ``model[0]`` are set by hand (no capture)."""
    k = KFACOptimizer(model, opt, damping=1e-2, update_freq=10**9, **kw)
    k.steps = 1  # never capture
    return k


def test_kfac_precondition_decay_preconditions_the_l2_term():
    """With the option the SGD update is lr * G^-1 (dW + wd W) A^-1; without it the decay is added after."""
    from fishertune.fisher.kfac import KFACBlock

    torch.manual_seed(0)
    lr, wd = 0.1, 0.3
    A = torch.randn(4, 4)
    A = A @ A.t() + torch.eye(4)                              # [in + 1 bias column]
    G = torch.randn(2, 2)
    G = G @ G.t() + torch.eye(2)
    for option in (True, False):
        model = nn.Sequential(nn.Linear(3, 2))
        w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
        k = _fixed_kfac(model, torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd), precondition_decay=option)
        blk = KFACBlock(A, G, True, (2, 3))
        k.blocks["0"], k.inverses["0"] = blk, blk.inverses(k.damping, k.pi)
        gw, gb = torch.randn(2, 3), torch.randn(2)
        model[0].weight.grad, model[0].bias.grad = gw.clone(), gb.clone()
        k.step()
        A_inv, G_inv = k.inverses["0"]
        if option:
            full = G_inv @ torch.cat([gw + wd * w0, (gb + wd * b0)[:, None]], 1) @ A_inv
        else:
            full = G_inv @ torch.cat([gw, gb[:, None]], 1) @ A_inv + wd * torch.cat([w0, b0[:, None]], 1)
        torch.testing.assert_close(model[0].weight.detach(), w0 - lr * full[:, :3])
        torch.testing.assert_close(model[0].bias.detach(), b0 - lr * full[:, 3])


def test_kfac_rescale_moments_by_the_change_of_the_diagonal():
    """At each factor update Adam's moments are multiplied by new/old G^-1_ii A^-1_jj (and its square)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    k = KFACOptimizer(model, opt, damping=1e-2, update_freq=1, rescale_moments=True)
    x = torch.randn(16, 3)
    y = torch.randint(0, 2, (16,))
    seen = []
    for t in range(3):
        opt.zero_grad()
        if t > 0:
            st = opt.state[model[0].weight]
            before = (st["exp_avg"].clone(), st["exp_avg_sq"].clone(), k.inverses.get("0"))
        nn.functional.cross_entropy(model(x), y).backward()
        if t == 0:
            k.step()
            continue
        k.precondition()  # updates the factors (captured in this forward), rescales, preconditions
        A_inv, G_inv = k.inverses["0"]
        new = torch.outer(G_inv.diagonal(), A_inv.diagonal())
        old = torch.outer(before[2][1].diagonal(), before[2][0].diagonal())
        r = (new / old)[:, :3]
        torch.testing.assert_close(st["exp_avg"], before[0] * r)
        torch.testing.assert_close(st["exp_avg_sq"], before[1] * r**2)
        seen.append(float((r - 1).abs().max()))
        opt.step()
    assert max(seen) > 1e-4  # the factors moved, so the check had something to compare
    k.remove()


def test_fishertuner_binds_kfac_to_its_optimizer_and_its_options():
    from fishertune.tune import FisherTuneConfig, FisherTuner

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    cfg = FisherTuneConfig(use_natural_gradient=True, natural_gradient="kfac")
    tuner = FisherTuner(model, cfg, {"shared": ["0.*"], "specific": ["2.*"]}, lambda m, b: {}, lambda: [])
    opt = tuner.make_optimizer("adam")
    assert tuner.kfac is not None and tuner.kfac.optimizer is opt
    assert tuner.kfac.rescale_moments and tuner.kfac.precondition_decay
    off = FisherTuneConfig(use_natural_gradient=True, natural_gradient="kfac",
                           natural_gradient_rescale_moments=False, natural_gradient_precondition_decay=False)
    t2 = FisherTuner(model, off, {"shared": ["0.*"], "specific": ["2.*"]}, lambda m, b: {}, lambda: [])
    assert not t2.kfac.rescale_moments and not t2.kfac.precondition_decay
    tuner.kfac.remove()
    t2.kfac.remove()
