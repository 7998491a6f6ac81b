"""Scenario loading, the validation hold-out, negatives, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from cdr_helpers import write_pair

from fishertune.config import ConfigError
from fishertune.recsys.cdr.batches import Histories, keep_counts
from fishertune.recsys.cdr.data import (
    available_pairs,
    build_cdr,
    hold_out_one,
    load_cdr,
)


def test_intra_scenario_and_holdout(cdr_root):
    data, key = load_cdr("dual-user-intra", "aa_bb", val_seed=3, n_negatives=5)
    assert data.domains == ("aa", "bb") and data.n_users == 40 and data.shared.all()
    for dom in data.domains:
        p = data[dom]
        full, train = p.train_full.toarray() > 0, p.train.toarray() > 0
        vu, vi = p.users["valid"], p.items["valid"]
        assert len(np.unique(vu)) == len(vu)  # at most one per user
        assert (np.diff(p.train_full.indptr)[vu] >= 2).all()
        assert full[vu, vi].all() and not train[vu, vi].any()  # held out of training, from training
        assert (~train | full).all() and train.sum() + len(vu) == full.sum()
        tu, ti = p.users["test"], p.items["test"]
        assert not full[tu, ti].any()  # test disjoint from training
        assert not ((vu[:, None] == tu[None]) & (vi[:, None] == ti[None])).any()
        assert np.isin(ti, p.train_items).all()
    again, key2 = load_cdr("dual-user-intra", "aa_bb", val_seed=3, n_negatives=5)  # from the cache
    assert key2 == key
    for dom in data.domains:
        np.testing.assert_array_equal(again[dom].items["valid"], data[dom].items["valid"])
        np.testing.assert_array_equal(again[dom].negatives["test"], data[dom].negatives["test"])
    other, _ = load_cdr("dual-user-intra", "aa_bb", val_seed=4, n_negatives=5)
    assert any(not np.array_equal(other[d].items["valid"], data[d].items["valid"]) for d in data.domains)


def test_holdout_never_removes_an_item():
    train = sp.csr_matrix(np.array([[1, 1, 0], [0, 1, 1], [1, 0, 0]], dtype=np.float32))
    for seed in range(20):
        rest, u, _ = hold_out_one(train, seed)
        assert (np.asarray(rest.sum(0)).ravel() > 0).all()
        assert rest.nnz + len(u) == train.nnz and 2 not in u  # user 2 has a single item


def test_negatives_exclude_history_and_target(cdr_root):
    data, _ = load_cdr("dual-user-intra", "aa_bb", n_negatives=5)
    for dom in data.domains:
        p = data[dom]
        for stage, src, hist in (("test", "test", p.train_full), ("valid", "valid", p.train), ("select", "test", p.train_full)):
            neg = p.negatives[stage]
            assert neg.shape == (len(p.users[src]), 5)
            for r, (u, i) in enumerate(zip(p.users[src], p.items[src])):
                row = set(neg[r].tolist())
                assert len(row) == 5 and i not in row
                assert not row & set(hist[u].indices.tolist())
                assert row <= set(p.train_items.tolist())
    assert not np.array_equal(data["aa"].negatives["test"], data["aa"].negatives["select"])


def test_inter_scenario_cold_start(cdr_root):
    data, _ = load_cdr("dual-user-inter", "aa_bb", n_negatives=5)
    for dom in data.domains:
        p = data[dom]
        for stage in ("valid", "test"):
            assert (np.diff(p.train_full.indptr)[p.users[stage]] == 0).all()
        assert p.train.nnz == p.train_full.nnz


def test_bad_pair_and_task(cdr_root):
    assert available_pairs("dual-user-intra") == ["aa_bb", "bb_aa"]
    with pytest.raises(ConfigError, match="unknown domain pair 'xx_yy'.*available pairs: aa_bb, bb_aa"):
        load_cdr("dual-user-intra", "xx_yy")
    with pytest.raises(ConfigError, match="unknown task 'single'.*dual-user-intra, dual-user-inter"):
        load_cdr("single", "aa_bb")


def test_intra_needs_overlapping_users(tmp_path, monkeypatch):
    root = tmp_path / "d"
    write_pair(root, "dual-user-inter", pair="cc_dd", shared_only=False)
    folder = root / "cdr" / "dual-user-inter" / "cc_dd"
    monkeypatch.setenv("FISHERTUNE_DATA", str(root))
    with pytest.raises(ConfigError, match="every user in both domains"):
        build_cdr("dual-user-intra", "cc_dd", folder=folder, n_negatives=3)


def test_no_shared_users_is_an_error(tmp_path, monkeypatch):
    root = tmp_path / "d"
    for dom, other, off in (("ee", "ff", 0), ("ff", "ee", 1000)):
        d = root / "cdr" / "dual-user-intra" / f"{dom}_{other}"
        d.mkdir(parents=True)
        (d / "train.txt").write_text("".join(f"{u + off}\t{u % 3}\t1\n" for u in range(6)))
        (d / "test.txt").write_text("".join(f"{u + off}\t{(u + 1) % 3}\t1\n" for u in range(6)))
    monkeypatch.setenv("FISHERTUNE_DATA", str(root))
    with pytest.raises(ConfigError, match="users are in one domain only|share no user"):
        build_cdr("dual-user-intra", "ee_ff", n_negatives=1)


def test_masking_rate_and_subset():
    rng = np.random.default_rng(0)
    rows = [rng.choice(50, size=n, replace=False) for n in (10, 1, 3, 30)]
    m = sp.csr_matrix((np.ones(sum(map(len, rows)), np.float32),
                       (np.repeat(np.arange(4), [len(r) for r in rows]), np.concatenate(rows))), shape=(4, 50))
    hist = Histories([m, m], torch.device("cpu"))
    users = torch.arange(4)
    target = torch.tensor([int(r[0]) for r in rows])
    gen = torch.Generator().manual_seed(0)
    for mask_rate, max_len in ((0.5, 20), (0.1, 4), (0.0, 50)):
        sel, _ = hist.sample(0, users, max_len, mask_rate, exclude=target, generator=gen)
        assert sel.shape == (4, max_len)
        n_cand = torch.tensor([len(r) - 1 for r in rows])
        expect = keep_counts(n_cand, max_len, mask_rate)
        got = (sel != 50).sum(1)
        assert torch.equal(got, expect)
        for u, r in enumerate(rows):
            kept = sel[u][sel[u] != 50].tolist()
            assert len(set(kept)) == len(kept) and set(kept) <= set(r.tolist()) and int(target[u]) not in kept
    assert keep_counts(torch.tensor([0, 1, 2, 9, 100]), 10, 0.1).tolist() == [0, 1, 1, 8, 10]
    assert keep_counts(torch.tensor([0, 1, 2, 9, 100]), 10, 0.5).tolist() == [0, 1, 1, 4, 10]


@pytest.mark.slow
def test_real_sport_cloth(data_root):
    root = data_root("cdr/dual-user-intra/sport_cloth")
    data = build_cdr("dual-user-intra", "sport_cloth", folder=root, n_negatives=3)
    assert data.n_users == 9928
    assert len(data["sport"].users["test"]) == 8326 and len(data["cloth"].users["test"]) == 7540  # test.txt
    assert data["sport"].train_full.nnz == 92612
