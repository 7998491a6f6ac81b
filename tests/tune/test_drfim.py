"""DR-FIM: hand-computed values, an unperturbed copy has exactly zero extra term, the variational
floor, importance normalisation and threshold masks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fishertune.tune.drfim import (dr_fim, group_scales, masks_from_importance, normalize_importance, posterior_std,
                                   quantile_summary, strict_ranks, variational_floor)


def test_unperturbed_copy_has_zero_extra_term():
    torch.manual_seed(0)
    F = {"a": torch.rand(5, 3) ** 3, "b": torch.zeros(4), "c": torch.rand(2)}
    groups = {"shared": ["a", "b"], "specific": ["c"]}
    scale = group_scales(F, groups)
    copy = {n: t.clone() for n, t in F.items()}
    for floor in (0.0, 0.5):
        dr, extra = dr_fim(F, copy, (0.3, 0.2), scale=scale, floor=floor)
        for n in F:
            assert torch.equal(extra[n], torch.zeros_like(F[n]))
            assert torch.equal(dr[n], F[n] / scale[n])


def test_hand_computed_values():
    F = {"w": torch.tensor([1.0, 2.0, 0.0, 4.0])}
    Fp = {"w": torch.tensor([3.0, 2.0, 1.0, 1.0])}
    w = math.exp(-(0.1 + 0.2))
    dr, extra = dr_fim(F, Fp, (0.1, 0.2), eps=1e-3)                # raw scale (the paper's formula)
    want_extra = torch.tensor([w * 2 / (1 + 1e-3), 0.0, w * 1 / (0 + 1e-3), w * 3 / (1 + 1e-3)])
    torch.testing.assert_close(extra["w"], want_extra)
    torch.testing.assert_close(dr["w"], F["w"] + want_extra)
    # mean scale: s = 7/4; eps relative; floor from the variational prior
    s = 7 / 4
    dr2, extra2 = dr_fim(F, Fp, (0.1, 0.2), scale={"w": s}, floor=0.5, eps=1e-3)
    want2 = torch.tensor([w * 2 / (1 + 0.5 + 1e-3 * s), 0.0, w * 1 / (0.5 + 1e-3 * s), w * 3 / (1 + 0.5 + 1e-3 * s)])
    torch.testing.assert_close(extra2["w"], want2)
    torch.testing.assert_close(dr2["w"], F["w"] / s + want2)
    dr3, extra3 = dr_fim(F, None, (0.1, 0.2))
    assert torch.equal(extra3["w"], torch.zeros(4)) and torch.equal(dr3["w"], F["w"])


def test_variational_floor_equals_relative_change_of_posterior_precisions():
    F, Fp, tau, gamma = torch.tensor([0.2, 5.0]), torch.tensor([0.4, 1.0]), 0.5, 0.1
    lam, lamp = F / gamma + 1 / tau ** 2, Fp / gamma + 1 / tau ** 2
    _, extra = dr_fim({"w": F}, {"w": Fp}, (0.0, 0.0), floor=variational_floor(tau, gamma), eps=0.0)
    torch.testing.assert_close(extra["w"], (lam - lamp).abs() / torch.minimum(lam, lamp))


def test_posterior_std():
    F = torch.tensor([0.0, 1.0, 100.0])
    s = posterior_std(F, tau=0.1, gamma=0.5)
    torch.testing.assert_close(s, (F / 0.5 + 100.0).rsqrt())
    assert float(s[0]) == pytest.approx(0.1) and bool((s <= 0.1 + 1e-7).all())
    with pytest.raises(ValueError, match="variational_tau"):
        posterior_std(F, 0.0, 0.1)


def test_rank_and_max_normalisation():
    vals = {"a": torch.tensor([0.0, 3.0]), "b": torch.tensor([[0.0, 1.0]]), "c": torch.tensor([5.0])}
    groups = {"shared": ["a", "b"], "specific": ["c"]}
    imp = normalize_importance(vals, groups, "rank")
    torch.testing.assert_close(imp["a"], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(imp["b"], torch.tensor([[0.0, 2 / 3]]))
    torch.testing.assert_close(imp["c"], torch.tensor([1.0]))
    imp = normalize_importance(vals, groups, "max")
    torch.testing.assert_close(imp["a"], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(imp["b"], torch.tensor([[0.0, 1 / 3]]))
    with pytest.raises(ValueError, match="importance_normalization"):
        normalize_importance(vals, groups, "zscore")


def test_rank_threshold_keeps_top_fraction():
    torch.manual_seed(0)
    vals = {"a": torch.rand(1000), "b": torch.rand(10, 100)}
    groups = {"shared": ["a", "b"]}
    imp = normalize_importance(vals, groups, "rank")
    masks = masks_from_importance(imp, groups, {"shared": 0.7})
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == 600           # importance >= 0.7 <=> at least 0.7*(n-1) entries below: the top 600 of 2000
    top = torch.cat([vals["a"], vals["b"].reshape(-1)]).topk(600).values.min()
    assert bool((vals["a"][masks["a"]] >= top).all())


def test_empty_selection_warns_with_group_name():
    imp = {"a": torch.tensor([0.0, 0.0])}
    with pytest.warns(RuntimeWarning, match="'specific'"):
        masks_from_importance(imp, {"specific": ["a"]}, {"specific": 0.5})


def test_quantile_summary_and_zero_group_scale():
    s = quantile_summary([torch.arange(101.0)], "f")
    assert s["f_mean"] == 50 and s["f_max"] == 100 and s["f_q50"] == 50 and s["f_q90"] == 90
    assert group_scales({"a": torch.zeros(3)}, {"shared": ["a"]}) == {"a": 1.0}


# ------------------------------------------------------------------ fast paths equal the old ones
@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0.0, -0.0, 1.0, 2.5, 1e-30, 7.0, float("inf"), -3.0]), min_size=1, max_size=40))
def test_strict_ranks_equal_searchsorted_with_ties(values):
    x = torch.tensor(values)
    want = torch.searchsorted(torch.sort(x).values, x, right=False)   # the previous implementation
    assert torch.equal(strict_ranks(x), want)


def test_strict_ranks_large_random_with_ties_and_brute_force():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 500, (20_000,), generator=g).float() ** 2 / 7
    x[::11] = 0.0
    want = torch.searchsorted(torch.sort(x).values, x, right=False)
    assert torch.equal(strict_ranks(x), want)
    small = x[:300]
    brute = (small[None, :] < small[:, None]).sum(1)                   # #{j: v_j < v_i}
    assert torch.equal(strict_ranks(small), brute)


def test_rank_normalisation_equals_the_searchsorted_formula():
    torch.manual_seed(1)
    vals = {"a": (torch.rand(30, 7) * 4).floor(), "b": torch.zeros(5), "c": torch.rand(9)}
    groups = {"shared": ["a", "b"], "specific": ["c"]}
    got = normalize_importance(vals, groups, "rank")
    for names in groups.values():
        flat = torch.cat([vals[n].reshape(-1) for n in names])
        old = torch.searchsorted(torch.sort(flat).values, flat, right=False).float() / (flat.numel() - 1)
        assert torch.equal(torch.cat([got[n].reshape(-1) for n in names]), old)


@pytest.mark.parametrize("n", [1, 2, 5, 1000, 3001])
def test_quantile_summary_equals_full_sort(n):
    g = torch.Generator().manual_seed(n)
    ts = [torch.rand(n, generator=g) ** 3, (torch.rand(7, generator=g) * 3).floor()]
    got = quantile_summary(ts, "f", max_elems=2000)
    flat = torch.cat([t.reshape(-1) for t in ts])
    if flat.numel() > 2000:
        flat = flat[:: math.ceil(flat.numel() / 2000)]
    srt = torch.sort(flat).values                                         # the previous implementation
    for q in (0.1, 0.5, 0.9, 0.99):
        assert got[f"f_q{int(round(q * 100))}"] == float(srt[min(len(srt) - 1, int(q * (len(srt) - 1) + 0.5))])
