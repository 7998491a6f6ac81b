"""Split protocols: property tests (partition, no leak, determinism), plain-loop references, real data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from fishertune.recsys.data import (IdMap, Interactions, Split, held_out_users, holdout, leave_one_out,
                                    make_split, temporal)

MATS = ("train", "valid_input", "valid_target", "test_input", "test_target")


@st.composite
def logs(draw, max_users: int = 12, max_items: int = 15) -> Interactions:
    """A log with unique (user, item) pairs, timestamps with ties, rows in random order."""
    n_users = draw(st.integers(1, max_users))
    n_items = draw(st.integers(1, max_items))
    cells = draw(st.sets(st.tuples(st.integers(0, n_users - 1), st.integers(0, n_items - 1)), min_size=1,
                         max_size=n_users * n_items))
    cells = sorted(cells)
    perm = draw(st.permutations(range(len(cells))))
    users = np.array([cells[k][0] for k in perm], dtype=np.int64)
    items = np.array([cells[k][1] for k in perm], dtype=np.int64)
    times = np.array(draw(st.lists(st.integers(0, 6), min_size=len(cells), max_size=len(cells))), dtype=np.int64)
    # maps over all ids (some users / items may have no rows, as after a split of a larger log)
    return Interactions(users, items, IdMap(np.arange(n_users) * 7 + 1), IdMap(np.arange(n_items) + 1000),
                        None, times, "h")


def pairs(m: sp.csr_matrix) -> set[tuple[int, int]]:
    c = m.tocoo()
    return set(zip(c.row.tolist(), c.col.tolist()))


def check_common(split: Split, inter: Interactions) -> None:
    """Shapes, binary values, partition of every user's events, no input/target overlap."""
    for name in MATS:
        m = getattr(split, name)
        assert m.shape == (split.n_users, split.n_items) and m.dtype == np.float32
        assert np.all(m.data == 1.0)
    full = set(zip(inter.users.tolist(), inter.items.tolist()))
    tr, vt, tt = pairs(split.train), pairs(split.valid_target), pairs(split.test_target)
    assert tr | vt | tt == full and len(tr) + len(vt) + len(tt) == len(full)  # exact partition
    assert pairs(split.valid_input) == tr
    assert pairs(split.test_input) == tr | vt
    assert not (pairs(split.valid_input) & vt) and not (pairs(split.test_input) & tt) and not (tr & tt)


def assert_same(a: Split, b: Split) -> None:
    for name in MATS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape and (x != y).nnz == 0
    assert np.array_equal(a.item_ids.ids, b.item_ids.ids) and a.meta == b.meta


# -- leave-one-out ----------------------------------------------------------------------------------------


def loo_loop(inter: Interactions) -> tuple[set, set]:
    """Per-user reference: sort (time, row), last = test, second to last = valid, if >= 3 events."""
    valid, test = set(), set()
    for u in np.unique(inter.users):
        rows = [k for k in range(len(inter)) if inter.users[k] == u]
        rows.sort(key=lambda k: (inter.timestamps[k], k))
        if len(rows) >= 3:
            test.add((int(u), int(inter.items[rows[-1]])))
            valid.add((int(u), int(inter.items[rows[-2]])))
    return valid, test


@settings(max_examples=80, deadline=None)
@given(inter=logs())
def test_leave_one_out_properties(inter):
    split = leave_one_out(inter)
    check_common(split, inter)
    assert (pairs(split.valid_target), pairs(split.test_target)) == loo_loop(inter)
    counts = np.bincount(inter.users, minlength=inter.n_users)
    assert set(split.eval_users("test").tolist()) == set(np.flatnonzero(counts >= 3).tolist())
    assert_same(split, leave_one_out(inter))


def test_leave_one_out_hand_case():
    # user 0: items 5 (t=3), 6 (t=1), 7 (t=3, later row), 8 (t=2) -> test 7, valid 5; user 1 has two events
    inter = Interactions(np.array([0, 0, 1, 0, 0, 1]), np.array([0, 1, 0, 2, 3, 1]), IdMap(np.array([10, 11])),
                         IdMap(np.array([5, 6, 7, 8])), None, np.array([3, 1, 0, 3, 2, 1]))
    split = leave_one_out(inter)
    assert pairs(split.test_target) == {(0, 2)} and pairs(split.valid_target) == {(0, 0)}
    assert pairs(split.train) == {(0, 1), (0, 3), (1, 0), (1, 1)}
    assert split.meta["protocol"] == "leave_one_out"


def test_split_needs_unique_pairs_and_time():
    inter = Interactions(np.array([0, 0]), np.array([0, 0]), IdMap(np.array([1])), IdMap(np.array([1])), None,
                         np.array([1, 2]))
    with pytest.raises(ValueError, match="1 repeated"):
        leave_one_out(inter)
    no_time = Interactions(np.array([0]), np.array([0]), IdMap(np.array([1])), IdMap(np.array([1])))
    with pytest.raises(ValueError, match="no timestamps"):
        leave_one_out(no_time)
    with pytest.raises(ValueError, match="unknown split protocol"):
        make_split(no_time, "random")


# -- holdout and temporal -----------------------------------------------------------------------------------


def half_up(x: float) -> int:
    return math.floor(x + 0.5)


@settings(max_examples=60, deadline=None)
@given(inter=logs(), vr=st.sampled_from([0.0, 0.1, 0.25]), tr=st.sampled_from([0.1, 0.2, 0.5]),
       seed=st.integers(0, 3))
def test_holdout_properties(inter, vr, tr, seed):
    split = holdout(inter, vr, tr, seed)
    check_common(split, inter)
    counts = np.bincount(inter.users, minlength=inter.n_users)
    n_test = np.diff(split.test_target.indptr)
    n_valid = np.diff(split.valid_target.indptr)
    for u in range(inter.n_users):  # per-user counts follow the documented rounding
        c = int(counts[u])
        exp_t = max(0, min(half_up(tr * c), c - 1))
        exp_v = max(0, min(half_up(vr * c), c - 1 - exp_t))
        assert (n_test[u], n_valid[u]) == (exp_t, exp_v)
    assert_same(split, holdout(inter, vr, tr, seed))


def test_holdout_seed_changes_assignment():
    n = 200
    inter = Interactions(np.zeros(n, np.int64), np.arange(n), IdMap(np.array([0])), IdMap(np.arange(n)))
    a, b = holdout(inter, 0.1, 0.2, 0), holdout(inter, 0.1, 0.2, 1)
    assert a.test_target.nnz == b.test_target.nnz == 40 and pairs(a.test_target) != pairs(b.test_target)
    with pytest.raises(ValueError, match="sum < 1"):
        holdout(inter, 0.5, 0.5)


@settings(max_examples=60, deadline=None)
@given(inter=logs(), vr=st.sampled_from([0.0, 0.2]), tr=st.sampled_from([0.1, 0.3]),
       mode=st.sampled_from(["global", "user"]))
def test_temporal_properties(inter, vr, tr, mode):
    split = temporal(inter, vr, tr, mode)
    check_common(split, inter)
    t = {(int(u), int(i)): int(s) for u, i, s in zip(inter.users, inter.items, inter.timestamps)}
    parts = [pairs(split.train), pairs(split.valid_target), pairs(split.test_target)]
    if mode == "global":
        n = len(inter)
        assert len(parts[2]) == half_up(tr * n) and len(parts[1]) == half_up(vr * n)
        groups = [[t[p] for p in part] for part in parts]
    else:
        groups = []
        for u in range(inter.n_users):
            groups += [[[t[p] for p in part if p[0] == u] for part in parts]]
    for g in (groups if mode == "user" else [groups]):  # train <= valid <= test in time
        nonempty = [x for x in g if x]
        for early, late in zip(nonempty, nonempty[1:]):
            assert max(early) <= min(late)
    assert_same(split, temporal(inter, vr, tr, mode))


# -- held-out users ----------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(inter=logs(max_users=14, max_items=10), n_valid=st.integers(1, 3), n_test=st.integers(1, 3),
       seed=st.integers(0, 5), frac=st.sampled_from([0.2, 0.5]))
def test_held_out_users_properties(inter, n_valid, n_test, seed, frac):
    active = np.unique(inter.users)
    if n_valid + n_test >= len(active):
        with pytest.raises(ValueError, match="leave no training users"):
            held_out_users(inter, n_valid, n_test, frac, seed)
        return
    split = held_out_users(inter, n_valid, n_test, frac, seed)
    rows_of = lambda m: set(np.flatnonzero(np.diff(m.indptr) > 0).tolist())  # noqa: E731
    train_u = rows_of(split.train)
    valid_u = rows_of(split.valid_input) | rows_of(split.valid_target)
    test_u = rows_of(split.test_input) | rows_of(split.test_target)
    assert not (train_u & valid_u) and not (train_u & test_u) and not (valid_u & test_u)
    assert len(valid_u) <= n_valid and len(test_u) <= n_test
    assert split.user_ids is inter.user_ids
    # items: exactly those seen among training users, re-indexed
    orig = {(int(u), int(inter.item_ids.ids[i])) for u, i in zip(inter.users, inter.items)}
    to_orig = lambda m: {(u, int(split.item_ids.ids[i])) for u, i in pairs(m)}  # noqa: E731
    train_pairs = to_orig(split.train)
    seen = {i for _, i in train_pairs}
    assert set(split.item_ids.ids.tolist()) == seen
    assert train_pairs == {p for p in orig if p[0] in train_u}  # training users: full rows
    all_train_u = set(active.tolist()) - valid_u - test_u
    assert len(all_train_u) >= len(active) - n_valid - n_test
    for stage in ("valid", "test"):
        x, y = split.stage(stage)
        xi, yi = to_orig(x), to_orig(y)
        assert not (xi & yi)  # fold-in and target disjoint
        users = rows_of(x) | rows_of(y)
        for u in users:  # fold-in + target = the user's events on seen items; target size as documented
            mine = {p for p in orig if p[0] == u and p[1] in seen}
            assert {p for p in xi | yi if p[0] == u} == mine
            n_tgt = math.floor(frac * len(mine)) if len(mine) >= 5 else 0
            assert len([p for p in yi if p[0] == u]) == n_tgt
    # every held-out user's events on seen items appear in exactly one stage
    held = {p for p in orig if p[0] not in all_train_u and p[1] in seen}
    assert held == to_orig(split.valid_input) | to_orig(split.valid_target) | to_orig(split.test_input) \
        | to_orig(split.test_target)
    assert split.meta["counts"]["valid_users"] == n_valid
    assert_same(split, held_out_users(inter, n_valid, n_test, frac, seed))


# -- real data ------------------------------------------------------------------------------------------------


def test_real_ml1m_held_out_users(data_root, tmp_path, monkeypatch):
    """Liang et al.'s ML preprocessing (rating >= 4, users with >= 5), 600 / 600 held-out users."""
    from fishertune.recsys.data import DataConfig, load_split

    data_root("ml-1m")
    monkeypatch.setenv("FISHERTUNE_CACHE", str(tmp_path))
    cfg = DataConfig(name="ml-1m", min_rating=4, min_user_interactions=5,
                     split={"protocol": "held_out_users", "n_valid_users": 600, "n_test_users": 600, "seed": 98765})
    split, key = load_split(cfg)
    c = split.meta["counts"]
    assert split.meta["preprocess"]["after_min_rating"] == 575281  # ratings 4 and 5 in ML-1M
    assert split.n_users == split.meta["preprocess"]["users"] and 6000 < split.n_users <= 6040
    assert 3400 < split.n_items <= 3533 and c["train_users"] == split.n_users - 1200
    assert split.eval_users("valid").size > 590 and split.eval_users("test").size > 590
    for stage in ("valid", "test"):
        x, y = split.stage(stage)
        assert x.multiply(y).nnz == 0 and x.multiply(split.train).nnz == 0
        assert 0.15 < y.nnz / (x.nnz + y.nnz) <= 0.2  # 20 % targets, floored per user
    fresh, key2 = load_split(cfg, use_cache=False)
    assert key2 == key
    assert_same(split, fresh)
