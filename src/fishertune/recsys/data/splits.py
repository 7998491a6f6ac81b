"""Evaluation protocols: :class:`Interactions` -> :class:`Split`, vectorised, seeded and deterministic.

Every function sorts once (by user then a key, ``_sort.order_by``) and assigns rows by their rank within the
user's block, so there is no Python loop over users. Splits require unique (user, item) pairs (see
``readers.deduplicate``), which makes "no pair in both input and target" hold by construction.

- :func:`leave_one_out`: last event by time = test, second to last = validation.
- :func:`holdout`: a random fraction of each user's events for validation / test.
- :func:`temporal`: a global time cut, or each user's latest fraction.
- :func:`held_out_users`: Mult-VAE's protocol (Liang et al. 2018), validation / test users fold in 80 %.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from fishertune.recsys.data._sort import order_by
from fishertune.recsys.data.types import Interactions, Split

PROTOCOLS = ("leave_one_out", "holdout", "temporal", "held_out_users")


def _csr(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> sp.csr_matrix:
    mat = sp.csr_matrix((np.ones(len(users), dtype=np.float32), (users, items)), shape=(n_users, n_items))
    mat.sum_duplicates()
    mat.data[:] = 1.0
    return mat


def _require_unique(inter: Interactions) -> None:
    n_pairs = _csr(inter.users, inter.items, inter.n_users, inter.n_items).nnz
    if n_pairs != len(inter):
        raise ValueError(f"{inter.name or 'data'}: {len(inter) - n_pairs} repeated (user, item) rows; "
                         "deduplicate first (readers.deduplicate) so no pair lands in both input and target")


def _require_time(inter: Interactions, protocol: str) -> np.ndarray:
    if inter.timestamps is None:
        raise ValueError(f"{inter.name or 'data'}: protocol {protocol!r} orders events by time, but the "
                         "data has no timestamps (name its timestamp column)")
    return inter.timestamps


def _ranks(users: np.ndarray, key: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: rank within its user by ``key`` (ties by row order) and the user's row count."""
    n = len(users)
    order = order_by(users, key)
    counts = np.bincount(users, minlength=n_users)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - starts[users[order]]
    return rank, counts[users]


def _from_masks(inter: Interactions, valid: np.ndarray, test: np.ndarray, meta: dict[str, Any]) -> Split:
    """Split with train = the rest, valid_input = train, test_input = train + valid targets."""
    train = ~(valid | test)
    shape = (inter.n_users, inter.n_items)
    mat = lambda m: _csr(inter.users[m], inter.items[m], *shape)  # noqa: E731
    train_m, valid_m, test_m = mat(train), mat(valid), mat(test)
    test_in = (train_m + valid_m).tocsr()
    test_in.data[:] = 1.0
    meta = {**meta, "counts": {"train": int(train.sum()), "valid": int(valid.sum()), "test": int(test.sum()),
                               "valid_users": int(np.unique(inter.users[valid]).size),
                               "test_users": int(np.unique(inter.users[test]).size)}}
    return Split(train_m, train_m, valid_m, test_in, test_m, inter.user_ids, inter.item_ids, meta)


def leave_one_out(inter: Interactions) -> Split:
    """Each user's last event by time is the test target, the second to last the validation target.

    Ties in time keep file order. Users with fewer than 3 events keep them all in ``train`` (they get
    no target and are not evaluated): they still help training, and a user needs one training event
    to be scored meaningfully.
    """
    _require_unique(inter)
    rank, count = _ranks(inter.users, _require_time(inter, "leave_one_out"), inter.n_users)
    from_end = count - 1 - rank
    eligible = count >= 3
    return _from_masks(inter, eligible & (from_end == 1), eligible & (from_end == 0),
                       {"protocol": "leave_one_out", "settings": {"min_user_events": 3}})


def _fraction_counts(count: np.ndarray, valid_ratio: float, test_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-user (n_valid, n_test): ratio x count rounded half up, keeping at least one training event."""
    n_test = np.minimum(np.floor(test_ratio * count + 0.5).astype(np.int64), count - 1)
    n_valid = np.minimum(np.floor(valid_ratio * count + 0.5).astype(np.int64), count - 1 - n_test)
    return np.maximum(n_valid, 0), np.maximum(n_test, 0)


def _check_ratios(valid_ratio: float, test_ratio: float) -> None:
    if not (0 <= valid_ratio < 1 and 0 <= test_ratio < 1 and valid_ratio + test_ratio < 1):
        raise ValueError(f"valid_ratio={valid_ratio}, test_ratio={test_ratio}: each in [0, 1) and their sum < 1")


def holdout(inter: Interactions, valid_ratio: float = 0.1, test_ratio: float = 0.2, seed: int = 0) -> Split:
    """A random ``valid_ratio`` / ``test_ratio`` of each user's events (rounded half up, at least one
    event left for training) become validation / test targets."""
    _check_ratios(valid_ratio, test_ratio)
    _require_unique(inter)
    key = np.random.default_rng(seed).permutation(len(inter))
    rank, count = _ranks(inter.users, key, inter.n_users)
    n_valid, n_test = _fraction_counts(count, valid_ratio, test_ratio)
    test = rank < n_test
    valid = (rank >= n_test) & (rank < n_test + n_valid)
    return _from_masks(inter, valid, test, {"protocol": "holdout", "settings": {
        "valid_ratio": valid_ratio, "test_ratio": test_ratio, "seed": seed}})


def temporal(inter: Interactions, valid_ratio: float = 0.1, test_ratio: float = 0.2,
             mode: str = "global") -> Split:
    """Split by time. ``global``: the latest ``test_ratio`` of all events (ordered by time, ties by file
    order) is test, the ``valid_ratio`` before it validation; users may then have no training events.
    ``user``: each user's latest fraction, as :func:`holdout` but by time."""
    _check_ratios(valid_ratio, test_ratio)
    _require_unique(inter)
    t = _require_time(inter, "temporal")
    settings: dict[str, Any] = {"valid_ratio": valid_ratio, "test_ratio": test_ratio, "mode": mode}
    if mode == "global":
        n = len(inter)
        order = order_by(t)
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n)
        n_test = int(np.floor(test_ratio * n + 0.5))
        n_valid = int(np.floor(valid_ratio * n + 0.5))
        test = rank >= n - n_test
        valid = (rank >= n - n_test - n_valid) & ~test
        if valid.any():
            settings["valid_from_time"] = int(t[valid].min())
        if test.any():
            settings["test_from_time"] = int(t[test].min())
    elif mode == "user":
        rank, count = _ranks(inter.users, t, inter.n_users)
        from_end = count - 1 - rank
        n_valid, n_test = _fraction_counts(count, valid_ratio, test_ratio)
        test = from_end < n_test
        valid = (from_end >= n_test) & (from_end < n_test + n_valid)
    else:
        raise ValueError(f"unknown temporal mode {mode!r}; use 'global' or 'user'")
    return _from_masks(inter, valid, test, {"protocol": "temporal", "settings": settings})


def held_out_users(inter: Interactions, n_valid_users: int, n_test_users: int, target_fraction: float = 0.2,
                   seed: int = 0, min_target_user_events: int = 5) -> Split:
    """Strong generalisation (Liang et al. 2018, Mult-VAE): disjoint training / validation / test users.

    Users are shuffled (seeded); the last ``n_test_users`` are test users, the ``n_valid_users`` before
    them validation users, the rest training users (their full rows in ``train``). Only items seen among
    training users are kept and items re-indexed (as in the paper's code). Each held-out user's events
    are split at random: ``floor(target_fraction * n)`` become the target, the rest the fold-in input;
    users with fewer than ``min_target_user_events`` events (after the item filter) keep all as input.
    """
    if not 0 < target_fraction < 1:
        raise ValueError(f"target_fraction={target_fraction} must be in (0, 1)")
    if n_valid_users < 1 or n_test_users < 1:
        raise ValueError("n_valid_users and n_test_users must be at least 1")
    _require_unique(inter)
    active = np.flatnonzero(np.bincount(inter.users, minlength=inter.n_users) > 0)
    n_held = n_valid_users + n_test_users
    if n_held >= len(active):
        raise ValueError(f"{inter.name or 'data'}: {n_valid_users} + {n_test_users} held-out users leave no "
                         f"training users ({len(active)} users with events)")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(active)
    role = np.zeros(inter.n_users, dtype=np.int8)  # 0 train, 1 valid, 2 test (users without events: 0)
    role[perm[len(perm) - n_held:len(perm) - n_test_users]] = 1
    role[perm[len(perm) - n_test_users:]] = 2
    row_role = role[inter.users]
    seen = np.bincount(inter.items[row_role == 0], minlength=inter.n_items) > 0
    item_ids, remap = inter.item_ids.subset(seen)
    keep = seen[inter.items]
    users, items, row_role = inter.users[keep], remap[inter.items[keep]], row_role[keep]
    held = row_role > 0
    key = rng.permutation(len(users))
    rank, count = _ranks(users, key, inter.n_users)
    n_target = np.where(count >= min_target_user_events, np.floor(target_fraction * count).astype(np.int64), 0)
    target = held & (rank < n_target)
    fold_in = held & ~target
    shape = (inter.n_users, len(item_ids))
    mat = lambda m: _csr(users[m], items[m], *shape)  # noqa: E731
    train = row_role == 0
    valid, test = row_role == 1, row_role == 2
    meta = {"protocol": "held_out_users",
            "settings": {"n_valid_users": n_valid_users, "n_test_users": n_test_users,
                         "target_fraction": target_fraction, "seed": seed,
                         "min_target_user_events": min_target_user_events},
            "counts": {"train": int(train.sum()), "train_users": int(len(active) - n_held),
                       "valid_users": n_valid_users, "test_users": n_test_users,
                       "valid_input": int((fold_in & valid).sum()), "valid_target": int((target & valid).sum()),
                       "test_input": int((fold_in & test).sum()), "test_target": int((target & test).sum()),
                       "items_dropped": int(inter.n_items - len(item_ids)),
                       "rows_dropped": int(len(inter) - len(users))}}
    return Split(mat(train), mat(fold_in & valid), mat(target & valid), mat(fold_in & test), mat(target & test),
                 inter.user_ids, item_ids, meta)


def make_split(inter: Interactions, protocol: str, *, valid_ratio: float = 0.1, test_ratio: float = 0.2,
               temporal_mode: str = "global", n_valid_users: int = 100, n_test_users: int = 100,
               target_fraction: float = 0.2, seed: int = 0) -> Split:
    """Dispatch to a protocol by name (the settings a protocol does not use are ignored)."""
    if protocol == "leave_one_out":
        return leave_one_out(inter)
    if protocol == "holdout":
        return holdout(inter, valid_ratio, test_ratio, seed)
    if protocol == "temporal":
        return temporal(inter, valid_ratio, test_ratio, temporal_mode)
    if protocol == "held_out_users":
        return held_out_users(inter, n_valid_users, n_test_users, target_fraction, seed)
    raise ValueError(f"unknown split protocol {protocol!r}; use one of {PROTOCOLS}")


__all__ = ["PROTOCOLS", "leave_one_out", "holdout", "temporal", "held_out_users", "make_split"]
