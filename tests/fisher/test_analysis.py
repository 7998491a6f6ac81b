"""Analysis: capacity metrics by hand, curvature products vs dense brute force, Lanczos vs eigvalsh,
spectral density, sharpness, task overlap and Fisher distance."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from brute import brute_empirical, brute_ggn_diag
from fishertune.fisher import diagonal_fisher, get_likelihood
from fishertune.fisher.analysis import (CurvatureOperator, capacity_metrics, fisher_distance, group_importance,
                                        lanczos, sharpness, spectral_density, task_overlap, top_eigenvalues)


def tiny():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))


def data(n=10):
    return [(torch.randn(n, 3), torch.randint(0, 3, (n,)))]


def test_capacity_metrics_by_hand():
    f = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([0.0, 4.0])}
    m = capacity_metrics(f, n_samples=4)
    assert m["trace"] == 8 and m["n_params"] == 4
    assert math.isclose(m["effective_rank"], 64 / 26)
    assert math.isclose(m["condition_number"], 4.0)
    assert math.isclose(m["pac_bayes"], math.sqrt(2))
    d = 4 / 5 + 12 / 13 + 0 + 16 / 17
    assert math.isclose(m["effective_dimension"], d) and math.isclose(m["capacity_score"], d / 4)
    assert math.isclose(m["log_det"], math.log(1) + math.log(3) + math.log(1e-12) + math.log(4), rel_tol=1e-9)


def dense_empirical(model, x, y):
    lik = get_likelihood("categorical")
    rows = []
    for i in range(y.shape[0]):
        loss = lik.nll(model(x[i:i + 1]), y[i:i + 1])[0].sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]))
    G = torch.stack(rows)
    return G.t() @ G / y.shape[0]


def test_curvature_operators_match_brute_force():
    model = tiny()
    batches = data()
    x, y = batches[0]
    ef = CurvatureOperator(model, batches, kind="empirical")
    ggn = CurvatureOperator(model, batches, kind="ggn")
    E = ef.dense()
    torch.testing.assert_close(E, dense_empirical(model, x, y))
    G = ggn.dense()
    diag = brute_ggn_diag(model, (x,), y, get_likelihood("categorical"))
    torch.testing.assert_close(G.diagonal(), torch.cat([d.reshape(-1) for d in diag.values()]))
    torch.testing.assert_close(G, G.t())
    emp = brute_empirical(model, (x,), y, get_likelihood("categorical"))
    torch.testing.assert_close(E.diagonal(), torch.cat([d.reshape(-1) for d in emp.values()]))


def test_lanczos_top_eigenvalues_match_dense():
    model = tiny()
    op = CurvatureOperator(model, data(), kind="ggn")
    dense = op.dense()
    want = torch.linalg.eigvalsh(dense).flip(0)
    vals, vecs = top_eigenvalues(op, k=3, steps=op.dim, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(vals, want[:3], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(dense @ vecs[:, 0], vals[0] * vecs[:, 0], rtol=1e-5, atol=1e-8)
    few, _ = top_eigenvalues(op, k=1, steps=12, generator=torch.Generator().manual_seed(1))
    assert abs(float(few[0] - want[0])) < 1e-3 * float(want[0])  # converges fast for the top one


def test_spectral_density_integrates_to_one_and_mean_is_trace():
    A = torch.diag(torch.tensor([0.1, 0.2, 1.0, 3.0, 3.5, 0.0, 0.05, 2.0]).double())
    grid, dens = spectral_density(lambda v: A @ v, dim=8, steps=8, n_probes=20,
                                  generator=torch.Generator().manual_seed(0))
    step = float(grid[1] - grid[0])
    assert abs(float(dens.sum()) * step - 1) < 1e-2
    mean = float((grid * dens).sum()) * step
    assert abs(mean - float(A.trace()) / 8) < 0.25  # stochastic trace estimate


def test_lanczos_plain_matrix_exact():
    M = torch.randn(6, 6).double()
    M = M @ M.t()
    res = lanczos(lambda v: M @ v, 6, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(M).flip(0))


def test_sharpness_random_and_top_eigen():
    torch.manual_seed(0)
    model = tiny()
    batches = data(20)
    before = [p.detach().clone() for p in model.parameters()]
    loss_fn = nn.functional.cross_entropy
    rnd = sharpness(model, batches, loss_fn, epsilon=1e-2, n_directions=5, generator=torch.Generator().manual_seed(0))
    assert rnd["increases"].shape == (5,)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # restored
    op = CurvatureOperator(model, batches, kind="ggn")
    top = sharpness(model, batches, loss_fn, epsilon=1e-2, n_directions=2, directions="top-eigen", operator=op)
    # the top GGN direction is sharper than random ones on average (second-order)
    assert top["quadratic"][0] >= top["quadratic"][1] - 1e-12
    assert top["quadratic"][0] > 0


def test_task_overlap_and_distance_and_importance():
    f = {"w": torch.tensor([1.0, 2.0, 0.0])}
    assert task_overlap(f, f)["overlap"] == pytest.approx(1.0)
    g = {"w": torch.tensor([0.0, 0.0, 5.0])}
    assert task_overlap(f, g)["overlap"] == pytest.approx(0.0) and task_overlap(f, g)["cosine"] == 0
    with pytest.raises(ValueError, match="share no parameter"):
        task_overlap(f, {"v": torch.ones(3)})
    a, b = nn.Linear(2, 1), nn.Linear(2, 1)
    fisher = {"weight": torch.tensor([[2.0, 0.0]]), "bias": torch.tensor([1.0])}
    with torch.no_grad():
        a.weight.copy_(torch.tensor([[1.0, 5.0]]))
        b.weight.copy_(torch.tensor([[3.0, -5.0]]))
        a.bias.fill_(0.0)
        b.bias.fill_(1.0)
    d = fisher_distance(fisher, a, b)
    assert d["total"] == pytest.approx(2 * 4 + 1)
    model = tiny()
    res = diagonal_fisher(model, data(), progress=False)
    ranked = group_importance(res.fisher, by="layer")
    assert [r[0] for r in ranked] == sorted(["0", "2"], key=lambda k: -float(sum(
        v.sum() for n, v in res.items() if n.startswith(k + "."))))
