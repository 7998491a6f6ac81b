"""Top-K ranking metrics as pure torch functions on a hit matrix, one value per user.

Every function takes ``hits`` (``B x K`` bool): ``hits[b, r]`` is true when the item that user ``b``
ranks at position ``r`` (0-based) is one of the user's targets, and, where needed, ``n_targets``
(``B``): how many target items the user has in all (not only in the top K). Values are returned per
user (float64, shape ``B``) so callers can average, take a standard deviation, run paired tests or sum
across processes before dividing.

Definitions (``|T|`` = number of targets, ``rank`` 1-based):

- ``recall@K = hits in top K / min(K, |T|)``: the normalised recall of Mult-VAE (Liang et al. 2018),
  which reaches 1 for a perfect ranking even when ``|T| > K``.
- ``ndcg@K = DCG@K / IDCG@K`` with ``DCG = sum_r hit_r / log2(rank_r + 1)`` and the ideal DCG over
  ``min(K, |T|)`` items.
- ``hr@K``: 1 when any target is in the top K.
- ``precision@K = hits in top K / K``.
- ``mrr``: ``1 / rank`` of the first target in the *full* ranking (0 when no target can be ranked),
  computed from a rank tensor (see :func:`reciprocal_rank`), because the top K alone cannot tell
  rank ``K + 1`` from rank 1000.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["TOPK_METRICS", "recall_at_k", "ndcg_at_k", "hit_rate_at_k", "precision_at_k",
           "first_hit_rank", "reciprocal_rank", "topk_metrics", "rank_metrics"]

TOPK_METRICS = ("recall", "ndcg", "hr", "precision")

_DTYPE = torch.float64


def _check_hits(hits: Tensor, k: int) -> Tensor:
    if not isinstance(hits, Tensor) or hits.dim() != 2:
        raise ValueError(f"hits must be a 2-D tensor (users x ranks), got {type(hits).__name__} "
                         f"of shape {tuple(getattr(hits, 'shape', ()))}")
    if hits.dtype != torch.bool:
        raise ValueError(f"hits must be a bool tensor, got dtype {hits.dtype}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > hits.shape[1]:
        raise ValueError(f"k={k} exceeds the {hits.shape[1]} ranks in the hit matrix")
    return hits[:, :k]


def _check_n_targets(hits: Tensor, n_targets: Tensor) -> Tensor:
    n_targets = torch.as_tensor(n_targets, device=hits.device)
    if n_targets.shape != (hits.shape[0],):
        raise ValueError(f"n_targets must have shape ({hits.shape[0]},), got {tuple(n_targets.shape)}")
    if n_targets.numel() and bool((n_targets < 1).any()):
        bad = int(torch.nonzero(n_targets < 1)[0, 0])
        raise ValueError(f"user row {bad} has n_targets={n_targets[bad].item()}; every user needs >= 1 "
                         "target (drop users without targets before computing metrics)")
    if n_targets.numel() and bool((hits.sum(1) > n_targets).any()):
        bad = int(torch.nonzero(hits.sum(1) > n_targets)[0, 0])
        raise ValueError(f"user row {bad} has {int(hits[bad].sum())} hits but n_targets="
                         f"{n_targets[bad].item()}; n_targets must count all of the user's targets")
    return n_targets.to(torch.long)


def _discounts(k: int, device: torch.device) -> Tensor:
    """``1 / log2(rank + 1)`` for ranks ``1..k``."""
    return 1.0 / torch.log2(torch.arange(2, k + 2, device=device, dtype=_DTYPE))


def recall_at_k(hits: Tensor, n_targets: Tensor, k: int) -> Tensor:
    """Normalised recall: hits in the top ``k`` over ``min(k, n_targets)``."""
    top = _check_hits(hits, k)
    n_targets = _check_n_targets(hits, n_targets)
    return top.sum(1, dtype=_DTYPE) / n_targets.clamp(max=k).to(_DTYPE)


def ndcg_at_k(hits: Tensor, n_targets: Tensor, k: int) -> Tensor:
    """NDCG with binary relevance; the ideal ranking puts ``min(k, n_targets)`` targets first."""
    top = _check_hits(hits, k)
    n_targets = _check_n_targets(hits, n_targets)
    disc = _discounts(k, hits.device)
    dcg = (top.to(_DTYPE) * disc).sum(1)
    idcg = torch.cumsum(disc, 0)[n_targets.clamp(max=k) - 1]
    return dcg / idcg


def hit_rate_at_k(hits: Tensor, k: int) -> Tensor:
    """1 where any target is in the top ``k``, else 0."""
    return _check_hits(hits, k).any(1).to(_DTYPE)


def precision_at_k(hits: Tensor, k: int) -> Tensor:
    """Hits in the top ``k`` over ``k``."""
    return _check_hits(hits, k).sum(1, dtype=_DTYPE) / k


def first_hit_rank(hits: Tensor) -> Tensor:
    """1-based rank of the first hit in each row of ``hits``; ``inf`` where the row has none."""
    _check_hits(hits, 1)
    any_hit = hits.any(1)
    first = hits.to(torch.uint8).argmax(1).to(_DTYPE) + 1  # argmax returns the first maximum
    return torch.where(any_hit, first, torch.full_like(first, float("inf")))


def reciprocal_rank(rank: Tensor) -> Tensor:
    """``1 / rank`` for 1-based ranks of the first relevant item; ``inf`` (never ranked) gives 0.

    Pass ranks over the full ranking (e.g. from the evaluator) for MRR; ranks from
    :func:`first_hit_rank` give the truncated MRR@K instead.
    """
    rank = torch.as_tensor(rank).to(_DTYPE)
    if rank.dim() != 1:
        raise ValueError(f"rank must be 1-D (one rank per user), got shape {tuple(rank.shape)}")
    if bool(torch.isnan(rank).any()) or bool((rank < 1).any()):
        bad = int(torch.nonzero(torch.isnan(rank) | (rank < 1))[0, 0])
        raise ValueError(f"rank must be >= 1 or inf; row {bad} has {rank[bad].item()}")
    return torch.where(torch.isinf(rank), torch.zeros_like(rank), 1.0 / rank)


def topk_metrics(hits: Tensor, n_targets: Tensor, ks: Iterable[int],
                 metrics: Iterable[str] = TOPK_METRICS) -> dict[str, Tensor]:
    """All requested ``metric@k`` per user in one pass (one cumulative sum shared by every ``k``).

    Returns ``{"recall@20": tensor(B), ...}``; the results equal the single-metric functions.
    """
    ks = sorted(set(ks))
    metrics = list(metrics)
    unknown = [m for m in metrics if m not in TOPK_METRICS]
    if unknown:
        raise ValueError(f"unknown top-K metric(s) {unknown}; choose from {TOPK_METRICS}")
    if not ks:
        raise ValueError("ks is empty")
    top = _check_hits(hits, max(ks))
    for k in ks:
        _check_hits(hits, k)
    n_targets = _check_n_targets(hits, n_targets)
    kmax = max(ks)
    cum_hits = torch.cumsum(top.to(_DTYPE), 1)  # hits within the top 1..kmax
    out: dict[str, Tensor] = {}
    if "ndcg" in metrics:
        disc = _discounts(kmax, hits.device)
        cum_dcg = torch.cumsum(top.to(_DTYPE) * disc, 1)
        cum_idcg = torch.cumsum(disc, 0)
    for k in ks:
        n_hit = cum_hits[:, k - 1]
        ideal = n_targets.clamp(max=k)
        for m in metrics:
            if m == "recall":
                val = n_hit / ideal.to(_DTYPE)
            elif m == "ndcg":
                val = cum_dcg[:, k - 1] / cum_idcg[ideal - 1]
            elif m == "hr":
                val = (n_hit > 0).to(_DTYPE)
            else:  # precision
                val = n_hit / k
            out[f"{m}@{k}"] = val
    return out


def rank_metrics(rank: Tensor, ks: Iterable[int],
                 metrics: Iterable[str] = ("hr", "ndcg", "mrr")) -> dict[str, Tensor]:
    """Metrics of a single relevant item at 1-based ``rank`` (leave-one-out, sampled protocols).

    ``hr@k = [rank <= k]``, ``ndcg@k = [rank <= k] / log2(rank + 1)`` (the ideal DCG of one item is 1),
    ``mrr = 1 / rank``; ``inf`` ranks score 0 everywhere.
    """
    ks = sorted(set(ks))
    metrics = list(metrics)
    unknown = [m for m in metrics if m not in ("hr", "ndcg", "mrr")]
    if unknown:
        raise ValueError(f"unknown rank metric(s) {unknown}; choose from ('hr', 'ndcg', 'mrr')")
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive ints, got {ks}")
    rr = reciprocal_rank(rank)  # validates; 0 for inf
    rank = rank.to(_DTYPE)
    out: dict[str, Tensor] = {}
    for m in metrics:
        if m == "mrr":
            out["mrr"] = rr
            continue
        for k in ks:
            inside = rank <= k
            if m == "hr":
                out[f"hr@{k}"] = inside.to(_DTYPE)
            else:
                out[f"ndcg@{k}"] = torch.where(inside, 1.0 / torch.log2(rank.clamp(max=k) + 1),
                                               torch.zeros_like(rank))
    return out
