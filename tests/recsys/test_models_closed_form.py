"""Popularity and EASE against brute-force references on tiny matrices."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fishertune.recsys.models import EASE, EASEConfig, Popularity, PopularityConfig
from fishertune.recsys.models.ease import ease_from_gram, gram_matrix




def _random_csr(n_users: int, n_items: int, density: float, seed: int) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = (rng.random((n_users, n_items)) < density).astype(np.float32)
    return sp.csr_matrix(dense)


def _ease_brute_force(x: np.ndarray, lam: float) -> np.ndarray:
    """Minimise ||X - XB||^2 + lam ||B||^2 s.t. diag(B) = 0, one column at a time: column j is a ridge
    regression of X[:, j] on the other columns (a direct dense solve, no closed-form trick)."""
    n = x.shape[1]
    b = np.zeros((n, n))
    for j in range(n):
        others = [i for i in range(n) if i != j]
        a = x[:, others]
        b[others, j] = np.linalg.solve(a.T @ a + lam * np.eye(n - 1), a.T @ x[:, j])
    return b


def test_popularity_counts_training_interactions():
    train = sp.csr_matrix(np.array([[1, 0, 2], [1, 0, 0], [0, 0, 5], [1, 0, 1]], dtype=np.float32))
    m = Popularity(PopularityConfig(), 4, 3)
    m.fit(train)
    assert m.counts.tolist() == [3.0, 0.0, 3.0]  # ratings count once each
    scores = m.score(torch.tensor([0, 2]), torch.zeros(2, 3))
    assert scores.shape == (2, 3) and torch.equal(scores[1], torch.tensor([3.0, 0.0, 3.0]))


def test_popularity_sums_duplicate_entries_once_per_pair():
    train = sp.csr_matrix((np.ones(3, np.float32), np.array([1, 1, 0]), np.array([0, 3])), shape=(1, 2))
    m = Popularity(PopularityConfig(), 1, 2)
    m.fit(train)
    assert m.counts.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("backend", ["scipy", "torch"])
@pytest.mark.parametrize("lam", [0.5, 10.0])
def test_ease_matches_the_constrained_ridge_objective(backend, lam):
    x = _random_csr(30, 9, 0.3, seed=1)
    b = ease_from_gram(gram_matrix(x), lam, backend=backend).double().numpy()
    ref = _ease_brute_force(x.toarray().astype(np.float64), lam)
    np.testing.assert_allclose(b, ref, rtol=2e-5, atol=1e-6)
    assert np.all(np.diag(b) == 0)


def test_ease_model_fit_and_score():
    x = _random_csr(25, 7, 0.35, seed=2)
    m = EASE(EASEConfig(lambda_=2.0), 25, 7)
    m.fit(x)
    ref = _ease_brute_force(x.toarray().astype(np.float64), 2.0)
    np.testing.assert_allclose(m.B.numpy(), ref, rtol=2e-5, atol=1e-6)
    hist = torch.tensor(x[[0, 3]].toarray())
    np.testing.assert_allclose(m.score(torch.tensor([0, 3]), hist).numpy(), hist.numpy() @ ref,
                               rtol=1e-4, atol=1e-5)
    assert "B" in m.state_dict()
    with pytest.raises(ValueError, match="history must be B x 7"):
        m.score(torch.tensor([0]), torch.zeros(1, 6))


def test_ease_binarises_ratings():
    x = _random_csr(20, 6, 0.4, seed=3)
    rated = x.copy()
    rated.data = np.random.default_rng(0).integers(1, 6, size=rated.nnz).astype(np.float32)
    np.testing.assert_array_equal(gram_matrix(rated), gram_matrix(x))


def test_ease_rejects_a_non_positive_definite_system():
    gram = np.zeros((3, 3))
    with pytest.raises(np.linalg.LinAlgError, match="lambda_"):
        ease_from_gram(gram.copy(), -1.0, backend="scipy")
    with pytest.raises(np.linalg.LinAlgError, match="lambda_"):
        ease_from_gram(gram.copy(), -1.0, backend="torch")
    with pytest.raises(ValueError, match="backend"):
        ease_from_gram(gram.copy(), 1.0, backend="cupy")


@settings(max_examples=25, deadline=None)
@given(n_users=st.integers(1, 12), n_items=st.integers(2, 8), density=st.floats(0.0, 1.0),
       seed=st.integers(0, 10_000), lam=st.floats(0.1, 50.0))
def test_ease_backends_agree_and_satisfy_the_optimality_conditions(n_users, n_items, density, seed, lam):
    x = _random_csr(n_users, n_items, density, seed)
    b_scipy = ease_from_gram(gram_matrix(x), lam, backend="scipy").double().numpy()
    b_torch = ease_from_gram(gram_matrix(x), lam, backend="torch").double().numpy()
    np.testing.assert_allclose(b_scipy, b_torch, rtol=1e-5, atol=1e-6)
    # KKT: the gradient of the objective, G (B - I) + lam B, vanishes off the diagonal
    g = gram_matrix(x)
    grad = g @ (b_scipy - np.eye(n_items)) + lam * b_scipy
    off = ~np.eye(n_items, dtype=bool)
    assert np.abs(grad[off]).max() <= 1e-4 * max(1.0, np.abs(g).max())
