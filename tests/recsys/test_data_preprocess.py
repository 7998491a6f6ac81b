"""Preprocessing against plain loops: rating threshold, count filters, k-core, re-indexing."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fishertune.recsys.data import EmptyDataError, IdMap, Interactions, filter_interactions, reindex


def make(rows: list[tuple[int, int, float]]) -> Interactions:
    u = np.array([r[0] for r in rows], dtype=np.int64)
    i = np.array([r[1] for r in rows], dtype=np.int64)
    r = np.array([r[2] for r in rows], dtype=np.float32)
    user_ids, uc = IdMap.from_values(u * 10)  # original ids differ from indices on purpose
    item_ids, ic = IdMap.from_values(i + 100)
    return Interactions(uc, ic, user_ids, item_ids, r, np.arange(len(rows), dtype=np.int64), "t")


def originals(inter: Interactions) -> list[tuple]:
    return [(int(inter.user_ids.ids[u]), int(inter.item_ids.ids[i]), float(r))
            for u, i, r in zip(inter.users, inter.items, inter.ratings)]


def brute(rows, min_rating, min_u, min_i, k_core):
    rows = [(u * 10, i + 100, r) for u, i, r in rows if min_rating is None or r >= min_rating]
    while True:
        before = len(rows)
        ci = Counter(i for _, i, _ in rows)
        rows = [x for x in rows if ci[x[1]] >= min_i]
        cu = Counter(u for u, _, _ in rows)
        rows = [x for x in rows if cu[x[0]] >= min_u]
        if not k_core or len(rows) == before:
            return rows


rows_strategy = st.lists(st.tuples(st.integers(0, 8), st.integers(0, 8), st.sampled_from([1.0, 2.0, 3.0, 4.0, 5.0])),
                         min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(rows=rows_strategy, min_rating=st.sampled_from([None, 3.0, 4.0]), min_u=st.integers(0, 4),
       min_i=st.integers(0, 4), k_core=st.booleans())
def test_filters_match_plain_loop(rows, min_rating, min_u, min_i, k_core):
    expect = brute(rows, min_rating, min_u, min_i, k_core)
    if not expect:
        with pytest.raises(EmptyDataError, match="no interactions left"):
            filter_interactions(make(rows), min_rating, min_u, min_i, k_core)
        return
    out, report = filter_interactions(make(rows), min_rating, min_u, min_i, k_core)
    assert originals(out) == expect
    # contiguous re-indexing: every index used, maps hold exactly the survivors
    assert set(out.users) == set(range(out.n_users)) and set(out.items) == set(range(out.n_items))
    assert sorted({u for u, _, _ in expect}) == list(out.user_ids.ids)
    assert report["interactions"] == len(expect)
    if k_core:
        assert np.bincount(out.users).min() >= min_u and np.bincount(out.items).min() >= min_i


def test_kcore_hand_case():
    # item 2 has one user; dropping it leaves user 1 with one event, which then drops item 1 to one user
    rows = [(0, 0, 5), (0, 1, 5), (1, 1, 5), (1, 2, 5), (2, 0, 5), (2, 3, 5), (0, 3, 5)]
    one_pass, _ = filter_interactions(make(rows), None, 2, 2, k_core=False)
    assert len(one_pass) == 5  # item 2 gone, then user 1 (one event left) gone; item 1 now has one user
    core, rep = filter_interactions(make(rows), None, 2, 2, k_core=True)
    assert originals(core) == [(0, 100, 5.0), (20, 100, 5.0), (20, 103, 5.0), (0, 103, 5.0)]
    assert rep["count_filter_rounds"] == 3


def test_min_rating_needs_ratings():
    inter = make([(0, 0, 1.0)])
    inter.ratings = None
    with pytest.raises(ValueError, match="no ratings"):
        filter_interactions(inter, min_rating=4)


def test_reindex_keeps_rows_and_drops_empty():
    inter = Interactions(np.array([2, 0]), np.array([3, 3]), IdMap(np.array([5, 6, 7])), IdMap(np.arange(4)))
    out = reindex(inter)
    assert list(out.user_ids.ids) == [5, 7] and list(out.users) == [1, 0] and list(out.item_ids.ids) == [3]
