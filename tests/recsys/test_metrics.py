"""Top-K metrics: hand-computed cases, a brute-force reference and hypothesis properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fishertune.recsys.metrics import (first_hit_rank, hit_rate_at_k, ndcg_at_k, precision_at_k, rank_metrics,
                                       recall_at_k, reciprocal_rank, topk_metrics)

HITS = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
N_T = torch.tensor([2, 3, 5])
L3 = 1 / math.log2(3)  # discount at rank 2
L4 = 1 / math.log2(4)  # rank 3
L5 = 1 / math.log2(5)  # rank 4


def close(t: torch.Tensor, expected: list[float]) -> None:
    assert t.dtype == torch.float64
    np.testing.assert_allclose(t.numpy(), expected, rtol=0, atol=1e-12)


def test_hand_computed_values() -> None:
    close(recall_at_k(HITS, N_T, 2), [1 / 2, 0, 1 / 2])
    close(recall_at_k(HITS, N_T, 4), [2 / 2, 0, 1 / 4])
    close(ndcg_at_k(HITS, N_T, 2), [1 / (1 + L3), 0, L3 / (1 + L3)])
    close(ndcg_at_k(HITS, N_T, 4), [(1 + L4) / (1 + L3), 0, L3 / (1 + L3 + L4 + L5)])
    close(hit_rate_at_k(HITS, 1), [1, 0, 0])
    close(hit_rate_at_k(HITS, 2), [1, 0, 1])
    close(precision_at_k(HITS, 4), [2 / 4, 0, 1 / 4])
    close(first_hit_rank(HITS), [1, math.inf, 2])
    close(reciprocal_rank(torch.tensor([1.0, 2.0, math.inf, 4.0])), [1, 0.5, 0, 0.25])


def test_rank_metrics_hand_computed() -> None:
    out = rank_metrics(torch.tensor([1, 3, 11]), ks=(1, 10))
    close(out["hr@1"], [1, 0, 0])
    close(out["hr@10"], [1, 1, 0])
    close(out["ndcg@10"], [1, 1 / 2, 0])  # 1/log2(3+1) = 1/2
    close(out["ndcg@1"], [1, 0, 0])
    close(out["mrr"], [1, 1 / 3, 1 / 11])
    close(rank_metrics(torch.tensor([math.inf]), ks=(5,))["ndcg@5"], [0])


def test_normalised_recall_is_not_monotone_below_the_target_count() -> None:
    # documented behaviour of Mult-VAE's recall: with |T| = 5 > K, recall@K = hits/K can fall with K
    hits = torch.tensor([[1, 0]], dtype=torch.bool)
    assert recall_at_k(hits, torch.tensor([5]), 1).item() == 1.0
    assert recall_at_k(hits, torch.tensor([5]), 2).item() == 0.5


@pytest.mark.parametrize("call, match", [
    (lambda: recall_at_k(HITS.int(), N_T, 2), "bool"),
    (lambda: recall_at_k(HITS[0], N_T, 2), "2-D"),
    (lambda: recall_at_k(HITS, N_T, 5), "exceeds"),
    (lambda: recall_at_k(HITS, N_T, 0), "positive"),
    (lambda: recall_at_k(HITS, torch.tensor([2, 0, 5]), 2), "n_targets=0"),
    (lambda: ndcg_at_k(HITS, torch.tensor([1, 3, 5]), 4), "2 hits"),
    (lambda: ndcg_at_k(HITS, torch.tensor([1, 3]), 4), "shape"),
    (lambda: reciprocal_rank(torch.tensor([0.0, 1.0])), "row 0"),
    (lambda: reciprocal_rank(torch.tensor([1.0, math.nan])), "row 1"),
    (lambda: topk_metrics(HITS, N_T, [2], ["map"]), "unknown"),
])
def test_bad_input_raises(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def _brute(hits: np.ndarray, n_t: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Per-row Python loop, straight from the definitions."""
    rows = {"recall": [], "ndcg": [], "hr": [], "precision": []}
    for h, n in zip(hits, n_t):
        top = h[:k]
        dcg = sum(1 / math.log2(r + 2) for r in range(k) if top[r])
        idcg = sum(1 / math.log2(r + 2) for r in range(min(k, n)))
        rows["recall"].append(top.sum() / min(k, n))
        rows["ndcg"].append(dcg / idcg)
        rows["hr"].append(float(top.any()))
        rows["precision"].append(top.sum() / k)
    return {m: np.array(v, dtype=float) for m, v in rows.items()}


@st.composite
def hit_matrices(draw):
    b = draw(st.integers(1, 6))
    width = draw(st.integers(1, 12))
    hits = np.array(draw(st.lists(st.lists(st.booleans(), min_size=width, max_size=width),
                                  min_size=b, max_size=b)), dtype=bool).reshape(b, width)
    extra = np.array(draw(st.lists(st.integers(0, 8), min_size=b, max_size=b)))
    n_t = np.maximum(hits.sum(1) + extra, 1)  # at least the hits, at least one
    return hits, n_t


@settings(max_examples=150, deadline=None)
@given(hit_matrices())
def test_against_brute_force_and_properties(data) -> None:
    hits_np, n_t_np = data
    hits, n_t = torch.from_numpy(hits_np), torch.from_numpy(n_t_np)
    width = hits.shape[1]
    ks = list(range(1, width + 1))
    all_k = topk_metrics(hits, n_t, ks)
    prev = None
    for k in ks:
        ref = _brute(hits_np, n_t_np, k)
        single = {"recall": recall_at_k(hits, n_t, k), "ndcg": ndcg_at_k(hits, n_t, k),
                  "hr": hit_rate_at_k(hits, k), "precision": precision_at_k(hits, k)}
        for m, v in single.items():
            np.testing.assert_allclose(v.numpy(), ref[m], atol=1e-12)
            np.testing.assert_allclose(all_k[f"{m}@{k}"].numpy(), ref[m], atol=1e-12)
            assert bool(((v >= 0) & (v <= 1 + 1e-12)).all())
        # ndcg is 0 exactly when there is no hit; precision * k = recall * min(k, |T|)
        assert torch.equal(single["ndcg"] > 0, single["hr"] > 0)
        np.testing.assert_allclose((single["precision"] * k).numpy(),
                                   (single["recall"] * n_t.clamp(max=k)).numpy(), atol=1e-9)
        if prev is not None:
            assert bool((single["hr"] >= prev["hr"]).all())  # HR is monotone in k
            fixed = n_t <= k - 1  # recall's denominator no longer moves: monotone
            assert bool((single["recall"][fixed] >= prev["recall"][fixed] - 1e-12).all())
        prev = single
    # MRR@width from the first hit agrees with HR: hr@k == 1 iff first rank <= k
    rr = reciprocal_rank(first_hit_rank(hits))
    for k in ks:
        assert torch.equal(all_k[f"hr@{k}"] > 0, rr >= 1 / k - 1e-12)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 30), st.integers(1, 40))
def test_perfect_ranking_scores_one(n_targets: int, k: int) -> None:
    hits = torch.zeros(1, k, dtype=torch.bool)
    hits[0, :min(k, n_targets)] = True
    n_t = torch.tensor([n_targets])
    assert recall_at_k(hits, n_t, k).item() == pytest.approx(1.0)
    assert ndcg_at_k(hits, n_t, k).item() == pytest.approx(1.0)
    assert hit_rate_at_k(hits, k).item() == 1.0
    assert precision_at_k(hits, k).item() == pytest.approx(min(k, n_targets) / k)
    assert reciprocal_rank(first_hit_rank(hits)).item() == 1.0
    # the worst placement of the same number of hits (at the bottom of the top k) scores lower ndcg
    if min(k, n_targets) < k:
        worst = torch.flip(hits, [1])
        assert ndcg_at_k(worst, n_t, k).item() < 1.0
