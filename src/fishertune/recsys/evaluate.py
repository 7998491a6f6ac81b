"""Ranking evaluation: full ranking over all items, and the sampled (target + N negatives) protocol.

Both evaluators take a ``score_fn(users, history) -> scores``: ``users`` is a LongTensor of user
indices, ``history`` the users' input rows as a dense float ``B x n_items`` tensor on ``device``, and
``scores`` a ``B x n_items`` float tensor (higher = ranked first). ``input`` and ``target`` are scipy
CSR ``n_users x n_items`` matrices, e.g. ``split.stage("test")`` of a
:class:`fishertune.recsys.data.types.Split`; nonzero entries count as interactions.

Conventions (shared by both evaluators):

- Users evaluated: those with at least one target, or the given ``users`` (each must have a target).
- Targets that are also in the input (splits guarantee there are none) are dropped from the targets
  with a warning: the input is what the model is given (and what full ranking masks), so they cannot
  be predicted.
- Per-user values are averaged with every user weighing the same. ``return_per_user=True`` also
  returns the per-user arrays (keys as in the summary, plus ``"user"``), for mean +- std and paired tests.
- ``distributed=True`` with ``torch.distributed`` initialised: each rank scores a contiguous shard of
  the users; metric sums and counts are all-reduced (per-user arrays all-gathered), so every rank
  returns what one process returns on all users. Without an initialised process group it runs alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.distributed as dist
from torch import Tensor

from fishertune.recsys.metrics import first_hit_rank, rank_metrics, reciprocal_rank, topk_metrics
from fishertune.utils.progress import track

__all__ = ["ScoreFn", "FULL_METRICS", "SAMPLED_METRICS", "evaluate_full", "evaluate_sampled",
           "sample_negatives"]

ScoreFn = Callable[[Tensor, Tensor], Tensor]
FULL_METRICS = ("recall", "ndcg", "hr", "mrr", "precision")
SAMPLED_METRICS = ("hr", "ndcg", "mrr")

PerUser = dict[str, np.ndarray]


# ----------------------------------------------------------------------------------------- inputs

def _binary_csr(mat: Any, name: str) -> sp.csr_matrix:
    """A CSR copy-free view with float32 ones for every stored nonzero (explicit zeros dropped)."""
    if not sp.issparse(mat):
        raise TypeError(f"'{name}' must be a scipy.sparse user x item matrix, got {type(mat).__name__}")
    mat = mat.tocsr()
    if not mat.has_canonical_format:
        mat = mat.copy()
        mat.sum_duplicates()
    if mat.nnz and not np.all(mat.data != 0):
        mat = mat.copy()
        mat.eliminate_zeros()
    return sp.csr_matrix((np.ones(mat.nnz, dtype=np.float32), mat.indices, mat.indptr), shape=mat.shape)


def _prepare(input: Any, target: Any) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    inp = _binary_csr(input, "input")
    tgt = _binary_csr(target, "target")
    if inp.shape != tgt.shape:
        raise ValueError(f"'input' has shape {inp.shape} but 'target' has shape {tgt.shape}; both must be "
                         "n_users x n_items")
    overlap = tgt.multiply(inp).tocsr()
    if overlap.nnz:
        n_users = int((np.diff(overlap.indptr) > 0).sum())
        warnings.warn(f"{overlap.nnz} target entries of {n_users} users are also in the input; they are "
                      "dropped from the targets (the input is given to the model and masked when ranking)",
                      stacklevel=3)
        tgt = (tgt - overlap).tocsr()
        tgt.eliminate_zeros()
        tgt.data[:] = 1.0
    return inp, tgt


def _select_users(tgt: sp.csr_matrix, users: Any) -> np.ndarray:
    counts = np.diff(tgt.indptr)
    if users is None:
        return np.flatnonzero(counts > 0).astype(np.int64)
    users = np.asarray(users).ravel()
    if users.size and not np.issubdtype(users.dtype, np.integer):
        raise ValueError(f"'users' must be integer user indices, got dtype {users.dtype}")
    users = users.astype(np.int64)
    if users.size and (users.min() < 0 or users.max() >= tgt.shape[0]):
        bad = users[(users < 0) | (users >= tgt.shape[0])][0]
        raise ValueError(f"'users' holds index {bad}, outside 0..{tgt.shape[0] - 1}")
    empty = users[counts[users] == 0]
    if empty.size:
        raise ValueError(f"{empty.size} of the given users have no target item (first: user {empty[0]}); "
                         "their metrics are undefined")
    return users


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = list(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    return sorted({int(k) for k in ks})


def _check_metrics(metrics: Sequence[str], allowed: tuple[str, ...]) -> list[str]:
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    unknown = [m for m in metrics if m not in allowed]
    if unknown or not metrics:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {allowed}")
    return list(dict.fromkeys(metrics))


def _names(metrics: list[str], ks: list[int]) -> list[str]:
    """Summary keys in order: ``recall@10, recall@20, ..., mrr``."""
    return [m if m == "mrr" else f"{m}@{k}" for m in metrics for k in (ks if m != "mrr" else [0])]


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def _setup(ks: Sequence[int], metrics: Sequence[str], allowed: tuple[str, ...], batch_size: int,
           device: str | torch.device, input: Any, target: Any, users: Any):
    """Validated arguments shared by both evaluators; the users to score are those with a target."""
    ks = _check_ks(ks)
    metrics = _check_metrics(metrics, allowed)
    batch_size = _check_batch_size(batch_size)
    inp, tgt = _prepare(input, target)
    users = _select_users(tgt, users)
    if users.size == 0:
        raise ValueError("no user to evaluate: the target matrix is empty")
    return ks, metrics, batch_size, torch.device(device), inp, tgt, users


def _coords(mat: sp.csr_matrix, rows: np.ndarray, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(row in batch, item)`` index tensors of the stored entries of ``mat[rows]``."""
    sub = mat[rows]
    r = np.repeat(np.arange(rows.size), np.diff(sub.indptr))
    return torch.from_numpy(r).to(device), torch.from_numpy(sub.indices.astype(np.int64)).to(device)


def _history(inp: sp.csr_matrix, rows: np.ndarray, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The dense binary input rows handed to ``score_fn``, and their coordinates."""
    h_row, h_col = _coords(inp, rows, device)
    history = torch.zeros(rows.size, inp.shape[1], device=device)
    history[h_row, h_col] = 1.0
    return history, h_row, h_col


def _scores(score_fn: ScoreFn, users: Tensor, history: Tensor, n_items: int) -> Tensor:
    scores = score_fn(users, history)
    if not isinstance(scores, Tensor) or tuple(scores.shape) != (len(users), n_items):
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"score_fn must return a ({len(users)}, {n_items}) tensor, got {shape}")
    if not scores.is_floating_point():
        scores = scores.float()
    return scores


def _raise_nan(scores: Tensor, users: Tensor) -> None:
    nan = torch.isnan(scores)
    if bool(nan.any()):
        row = int(torch.nonzero(nan.reshape(len(users), -1).any(1))[0, 0])
        raise ValueError(f"score_fn returned NaN scores for user {int(users[row])}")


# ------------------------------------------------------------------------------------ distributed

def _rank_world(distributed: bool) -> tuple[int, int]:
    if distributed and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _finish(per_user: dict[str, list[Tensor]], names: list[str], users: np.ndarray, world: int,
            device: torch.device, return_per_user: bool) -> dict[str, float] | tuple[dict[str, float], PerUser]:
    """Means over users (sums and counts all-reduced across ranks) and, if asked, per-user arrays."""
    local = {n: (torch.cat(per_user[n]) if per_user[n] else torch.zeros(0, dtype=torch.float64))
             for n in names}
    sums = torch.tensor([float(local[n].sum()) for n in names] + [float(len(local[names[0]]))],
                        dtype=torch.float64)
    if world > 1:
        red_dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
        sums = sums.to(red_dev)
        dist.all_reduce(sums)
        sums = sums.cpu()
    n = float(sums[-1])
    summary: dict[str, float] = {name: float(sums[i]) / n for i, name in enumerate(names)}
    summary["n_users"] = int(n)
    if not return_per_user:
        return summary
    arrays = {name: local[name].numpy() for name in names}
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, arrays)
        arrays = {name: np.concatenate([g[name] for g in gathered]) for name in names}
    return summary, {"user": users.copy(), **arrays}


# ---------------------------------------------------------------------------------- full ranking

@torch.no_grad()
def evaluate_full(score_fn: ScoreFn, input: sp.spmatrix, target: sp.spmatrix,
                  ks: Sequence[int] = (10, 20, 50, 100), metrics: Sequence[str] = FULL_METRICS,
                  users: np.ndarray | Sequence[int] | None = None, batch_size: int = 1024,
                  device: str | torch.device = "cpu", distributed: bool = False,
                  return_per_user: bool = False) -> dict[str, float] | tuple[dict[str, float], PerUser]:
    """Rank all items for each user, the user's input items masked, and average top-K metrics.

    Returns ``{"recall@20": ..., "ndcg@100": ..., "mrr": ..., "n_users": ...}`` (and the per-user
    arrays when ``return_per_user``). ``recall``/``ndcg``/``hr``/``precision`` are computed at every
    ``k`` in ``ks`` (see :mod:`fishertune.recsys.metrics`); ``mrr`` is over the full ranking.

    Ranking: input items get ``-inf`` and the top ``max(ks)`` come from ``torch.topk`` per batch of
    ``batch_size`` users (memory ~ ``batch_size x n_items x 10`` bytes on ``device``). Ties among
    scores are ordered as ``torch.topk`` returns them (arbitrary, as in Mult-VAE and RecBole); the
    MRR rank of a user with no target in the top ``max(ks)`` counts ties against the target. A target
    that ``score_fn`` scores ``-inf`` ranks with the masked items: never a hit, MRR 0. Ranks beyond
    ``n_items`` (``k > n_items``) hold no item and are never hits. A NaN score on an unmasked item
    raises ``ValueError`` naming the user (NaN on masked items is harmless and ignored). ``history``
    is binary: 1.0 for each of the user's input items.
    """
    ks, metrics, batch_size, device, inp, tgt, users = _setup(
        ks, metrics, FULL_METRICS, batch_size, device, input, target, users)
    n_items = inp.shape[1]
    kmax = max(ks)
    k_top = min(kmax, n_items)
    topk_names = [m for m in metrics if m != "mrr"]
    names = _names(metrics, ks)
    rank, world = _rank_world(distributed)
    local_users = np.array_split(users, world)[rank]
    per_user: dict[str, list[Tensor]] = {n: [] for n in names}
    starts = range(0, len(local_users), batch_size)
    for start in track(starts, "full-ranking evaluation", total=len(starts)):
        ub = local_users[start:start + batch_size]
        ub_t = torch.from_numpy(ub).to(device)
        history, h_row, h_col = _history(inp, ub, device)
        scores = _scores(score_fn, ub_t, history, n_items)
        t_row, t_col = _coords(tgt, ub, device)
        is_tgt = torch.zeros(ub.size, n_items, dtype=torch.bool, device=device)
        is_tgt[t_row, t_col] = True
        masked = scores.clone(memory_format=torch.contiguous_format)  # never write into score_fn's tensor
        masked[h_row, h_col] = float("-inf")  # sparse writes: cheaper than a dense mask pass
        vals, idx = torch.topk(masked, k_top, dim=1)
        _raise_nan(vals[:, :1], ub_t)  # topk ranks NaN above every number: a NaN score surfaces first
        hits = is_tgt.gather(1, idx) & (vals > float("-inf"))
        if k_top < kmax:
            hits = torch.cat([hits, hits.new_zeros(len(ub), kmax - k_top)], 1)
        n_tgt = torch.bincount(t_row, minlength=ub.size)
        values = topk_metrics(hits, n_tgt, ks, topk_names) if topk_names else {}
        if "mrr" in metrics:
            values["mrr"] = reciprocal_rank(_full_first_rank(hits, masked, t_row, t_col))
        for n in names:
            per_user[n].append(values[n].cpu())
    return _finish(per_user, names, users, world, device, return_per_user)


def _full_first_rank(hits: Tensor, masked: Tensor, t_row: Tensor, t_col: Tensor) -> Tensor:
    """Rank of the first target in the full ranking: from the top-K where it is there, else counted.

    Counted ranks are ``1 + #{unmasked non-targets scoring >= the best target}`` (ties against the
    target), which is always beyond the top-K, so MRR agrees with the top-K hits. One pass over the
    scores: ``#{items >= best}`` minus the targets tied at the best (targets are few: kept sparse).
    """
    rank = first_hit_rank(hits)
    t_s = masked[t_row, t_col]
    best = torch.full((len(hits),), float("-inf"), dtype=masked.dtype, device=masked.device)
    best = best.scatter_reduce(0, t_row, t_s, reduce="amax")
    tied = torch.bincount(t_row[t_s == best[t_row]], minlength=len(hits))
    ahead = (masked >= best[:, None]).sum(1) - tied
    counted = torch.where(best > float("-inf"), (ahead + 1).to(rank.dtype), torch.full_like(rank, float("inf")))
    return torch.where(torch.isinf(rank), counted, rank)


# ------------------------------------------------------------------------------- sampled protocol

def sample_negatives(input: sp.spmatrix, target: sp.spmatrix, users: np.ndarray | Sequence[int],
                     n_negatives: int = 99, seed: int = 0, sampling: str = "uniform",
                     candidates: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
    """``len(users) x n_negatives`` distinct items per user, none in the user's input or target.

    ``uniform``: every allowed item equally likely; ``popularity``: drawn in proportion to the item's
    number of users in ``input`` (items without any are never drawn), without replacement (successive
    sampling, via the exponential-keys method of Efraimidis & Spirakis). ``candidates`` (item indices)
    restricts the pool, e.g. to one domain's training items. Vectorised over blocks of users; the same
    ``seed`` and inputs give the same negatives. Raises if a user has fewer than ``n_negatives``
    allowed items.
    """
    if isinstance(n_negatives, bool) or not isinstance(n_negatives, (int, np.integer)) or n_negatives < 1:
        raise ValueError(f"n_negatives must be a positive int, got {n_negatives!r}")
    if sampling not in ("uniform", "popularity"):
        raise ValueError(f"sampling must be 'uniform' or 'popularity', got {sampling!r}")
    inp = _binary_csr(input, "input")
    tgt = _binary_csr(target, "target")
    if inp.shape != tgt.shape:
        raise ValueError(f"'input' has shape {inp.shape} but 'target' has shape {tgt.shape}")
    n_items = inp.shape[1]
    users = np.asarray(users, dtype=np.int64).ravel()
    pool = np.arange(n_items) if candidates is None else np.unique(np.asarray(candidates, dtype=np.int64))
    if pool.size and (pool[0] < 0 or pool[-1] >= n_items):
        raise ValueError(f"'candidates' holds item indices outside 0..{n_items - 1}")
    if n_negatives > pool.size:
        raise ValueError(f"n_negatives={n_negatives} exceeds the {pool.size} candidate items")
    col_of = np.full(n_items, -1, dtype=np.int64)
    col_of[pool] = np.arange(pool.size)
    weight = None
    if sampling == "popularity":
        weight = np.asarray(np.diff(inp.tocsc().indptr), dtype=np.float64)[pool]
    seen = (inp + tgt).tocsr()
    rng = np.random.default_rng(seed)
    out = np.empty((users.size, n_negatives), dtype=np.int64)
    block = max(1, (1 << 23) // max(1, pool.size))  # ~64 MB of float64 keys per block
    starts = range(0, users.size, block)
    for start in track(starts, "sampling negatives", total=len(starts)):
        ub = users[start:start + block]
        if weight is None:
            keys = rng.random((ub.size, pool.size))
        else:
            with np.errstate(divide="ignore"):
                keys = rng.standard_exponential((ub.size, pool.size)) / weight
        rows = seen[ub].tocoo()
        cols = col_of[rows.col]
        keep = cols >= 0
        keys[rows.row[keep], cols[keep]] = np.inf
        part = np.argpartition(keys, n_negatives - 1, axis=1)[:, :n_negatives]
        pkeys = np.take_along_axis(keys, part, 1)
        order = np.argsort(pkeys, axis=1, kind="stable")
        part = np.take_along_axis(part, order, 1)
        short = ~np.isfinite(np.take_along_axis(pkeys, order[:, -1:], 1)[:, 0])
        if short.any():
            row = int(np.flatnonzero(short)[0])
            avail = int(np.isfinite(keys[row]).sum())
            raise ValueError(f"user {ub[row]} has only {avail} items to draw {n_negatives} negatives from "
                             f"({sampling} sampling)")
        out[start:start + ub.size] = pool[part]
    return out


def _check_negatives(negatives: Any, users: np.ndarray, inp: sp.csr_matrix, tgt: sp.csr_matrix,
                     against_items: bool = True) -> np.ndarray:
    neg = np.asarray(negatives)
    n_users, n_items = inp.shape
    if neg.ndim != 2 or neg.shape[0] != n_users or not np.issubdtype(neg.dtype, np.integer):
        raise ValueError(f"'negatives' must be an integer array of shape (n_users={n_users}, N) whose row u "
                         f"holds user u's negatives, got {neg.dtype} array of shape {neg.shape}")
    neg = neg[users].astype(np.int64)
    if neg.size and (neg.min() < 0 or neg.max() >= n_items):
        r, c = np.argwhere((neg < 0) | (neg >= n_items))[0]
        raise ValueError(f"negatives of user {users[r]} hold item {neg[r, c]}, outside 0..{n_items - 1}")
    if not against_items:
        return neg
    rows = np.repeat(np.arange(users.size), neg.shape[1])
    neg_mat = sp.csr_matrix((np.ones(neg.size, np.float32), (rows, neg.ravel())), shape=(users.size, n_items))
    clash = neg_mat.multiply(tgt[users]).tocoo()
    if clash.nnz:
        raise ValueError(f"{clash.nnz} negatives are target items (first: user {users[clash.row[0]]}, "
                         f"item {clash.col[0]})")
    in_input = neg_mat.multiply(inp[users]).nnz
    if in_input:
        warnings.warn(f"{in_input} given negatives are in their user's input (history)", stacklevel=3)
    return neg


@torch.no_grad()
def evaluate_sampled(score_fn: ScoreFn, input: sp.spmatrix, target: sp.spmatrix, n_negatives: int = 99,
                     seed: int = 0, negatives: np.ndarray | None = None, ks: Sequence[int] = (1, 5, 10),
                     metrics: Sequence[str] = SAMPLED_METRICS, sampling: str = "uniform",
                     candidates: np.ndarray | Sequence[int] | None = None,
                     users: np.ndarray | Sequence[int] | None = None, batch_size: int = 1024,
                     device: str | torch.device = "cpu", distributed: bool = False,
                     return_per_user: bool = False,
                     check_negatives: bool = True) -> dict[str, float] | tuple[dict[str, float], PerUser]:
    """Rank each target item among the user's N negatives; average HR@K, NDCG@K and MRR.

    Negatives come from :func:`sample_negatives` (``n_negatives``, ``seed``, ``sampling``,
    ``candidates``) or are given as ``negatives[u]`` = user ``u``'s items (``n_users x N``, e.g. read
    from a benchmark file; a negative that is one of the user's targets is an error). Rank of a target
    = 1 + number of negatives scoring ``>=`` it: ties count against the target (pessimistic), so a
    constant ``score_fn`` scores 0, not chance. A user with several targets gets the mean over them
    (each ranked against the same negatives), so every user weighs the same. With ``negatives`` given,
    ``n_negatives``, ``seed``, ``sampling`` and ``candidates`` are unused. Input items are not masked
    here: only the target and its negatives are ranked. ``check_negatives=False`` skips the test of given
    negatives against the targets and the input (a sparse product over every negative: the costly part
    of a validation pass) for a caller that evaluates the same negatives every epoch and checked them
    once; shape and item range are always checked.
    """
    ks, metrics, batch_size, device, inp, tgt, users = _setup(
        ks, metrics, SAMPLED_METRICS, batch_size, device, input, target, users)
    if negatives is None:
        neg = sample_negatives(inp, tgt, users, n_negatives, seed, sampling, candidates)
    else:
        neg = _check_negatives(negatives, users, inp, tgt, against_items=check_negatives)
    n_items = inp.shape[1]
    names = _names(metrics, ks)
    rank_id, world = _rank_world(distributed)
    shard = np.array_split(np.arange(users.size), world)[rank_id]
    per_user: dict[str, list[Tensor]] = {n: [] for n in names}
    starts = range(0, shard.size, batch_size)
    for start in track(starts, "sampled evaluation", total=len(starts)):
        pos = shard[start:start + batch_size]
        ub = users[pos]
        ub_t = torch.from_numpy(ub).to(device)
        scores = _scores(score_fn, ub_t, _history(inp, ub, device)[0], n_items)
        neg_s = scores.gather(1, torch.from_numpy(neg[pos]).to(device))
        t_row, t_col = _coords(tgt, ub, device)
        t_s = scores[t_row, t_col]
        _raise_nan(neg_s, ub_t)
        _raise_nan(t_s[:, None], ub_t[t_row])
        rank = 1 + (neg_s[t_row] >= t_s[:, None]).sum(1)
        pair = rank_metrics(rank, ks, metrics)
        n_per = torch.bincount(t_row, minlength=ub.size).to(torch.float64)
        for n in names:
            total = torch.zeros(ub.size, dtype=torch.float64, device=device).index_add_(0, t_row, pair[n])
            per_user[n].append((total / n_per).cpu())
    return _finish(per_user, names, users, world, device, return_per_user)
