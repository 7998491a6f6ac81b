"""The evaluators against naive per-user Python loops, on random and real data, and across 2 processes."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fishertune.recsys.evaluate import evaluate_full, evaluate_sampled, sample_negatives
from fishertune.utils.settings import data_root


def dataset_file(rel: str) -> Path:
    """A file under FISHERTUNE_DATA, or skip the test when the dataset is absent."""
    path = data_root() / rel
    if not path.exists():
        pytest.skip(f"dataset file {rel} not found under FISHERTUNE_DATA ({data_root()})")
    return path


# ------------------------------------------------------------------------------------------ helpers

def random_data(n_users: int, n_items: int, seed: int, p_in: float = 0.2, p_tgt: float = 0.08,
                ties: bool = False):
    """Input/target CSR (disjoint), a score matrix (distinct per row unless ``ties``), dense copies."""
    rng = np.random.default_rng(seed)
    inp = rng.random((n_users, n_items)) < p_in
    inp[0, : n_items - 2], inp[0, -2:] = True, False  # a user with only 2 rankable items (< most k)
    tgt = (rng.random((n_users, n_items)) < p_tgt) & ~inp
    tgt[0, -1] = True
    tgt[1] = False  # a user without target: not evaluated
    if ties:
        scores = rng.integers(0, 4, (n_users, n_items)).astype(np.float32)
    else:
        scores = np.argsort(rng.random((n_users, n_items)), 1).astype(np.float32)  # permutations
    return sp.csr_matrix(inp.astype(np.float32)), sp.csr_matrix(tgt.astype(np.float32)), scores, inp, tgt


def table_score_fn(scores: np.ndarray, inp_dense: np.ndarray | None = None):
    table = torch.from_numpy(scores)

    def score_fn(users: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        assert users.dtype == torch.long and history.shape == (len(users), scores.shape[1])
        if inp_dense is not None:  # the evaluator hands over exactly the users' input rows
            assert np.array_equal(history.numpy() > 0, inp_dense[users.numpy()])
        return table[users]
    return score_fn


def naive_full(scores, inp, tgt, ks) -> dict[str, np.ndarray]:
    """Per-user loop straight from the definitions: sort the unmasked items, read off the metrics."""
    out: dict[str, list[float]] = {}
    for u in range(scores.shape[0]):
        targets = set(np.flatnonzero(tgt[u]).tolist())
        if not targets:
            continue
        order = [i for i in np.argsort(-scores[u].astype(np.float64), kind="stable") if not inp[u, i]]
        for k in ks:
            h = [i in targets for i in order[:k]]
            ideal = min(k, len(targets))
            dcg = sum(1 / math.log2(r + 2) for r, x in enumerate(h) if x)
            idcg = sum(1 / math.log2(r + 2) for r in range(ideal))
            out.setdefault(f"recall@{k}", []).append(sum(h) / ideal)
            out.setdefault(f"ndcg@{k}", []).append(dcg / idcg)
            out.setdefault(f"hr@{k}", []).append(float(any(h)))
            out.setdefault(f"precision@{k}", []).append(sum(h) / k)
        first = next(r for r, i in enumerate(order) if i in targets) + 1
        out.setdefault("mrr", []).append(1 / first)
    return {key: np.array(v) for key, v in out.items()}


def naive_sampled(scores, tgt, users, neg, ks) -> dict[str, np.ndarray]:
    """Per-user, per-target loop: rank = 1 + negatives scoring >= the target."""
    out: dict[str, list[float]] = {}
    for row, u in enumerate(users):
        per: dict[str, list[float]] = {}
        for t in np.flatnonzero(tgt[u]):
            rank = 1 + sum(int(scores[u, j] >= scores[u, t]) for j in neg[row])
            per.setdefault("mrr", []).append(1 / rank)
            for k in ks:
                per.setdefault(f"hr@{k}", []).append(float(rank <= k))
                per.setdefault(f"ndcg@{k}", []).append(1 / math.log2(rank + 1) if rank <= k else 0.0)
        for key, v in per.items():
            out.setdefault(key, []).append(float(np.mean(v)))
    return {key: np.array(v) for key, v in out.items()}


def assert_matches(summary, per_user, ref, users) -> None:
    assert summary["n_users"] == len(users)
    np.testing.assert_array_equal(per_user["user"], users)
    for key, values in ref.items():
        np.testing.assert_allclose(per_user[key], values, rtol=0, atol=1e-12, err_msg=key)
        assert summary[key] == pytest.approx(values.mean(), abs=1e-12), key


# ------------------------------------------------------------------------------------ full ranking

@pytest.mark.parametrize("n_users, n_items, ks, batch_size", [
    (40, 30, (1, 5, 10, 50), 7),      # k > n_items: ranks past the catalogue are never hits
    (120, 200, (10, 20, 50, 100), 1024),
    (33, 100, (3, 20), 1),
])
def test_full_matches_naive_loop(n_users, n_items, ks, batch_size) -> None:
    inp_csr, tgt_csr, scores, inp, tgt = random_data(n_users, n_items, seed=n_users)
    summary, per_user = evaluate_full(table_score_fn(scores, inp), inp_csr, tgt_csr, ks=ks,
                                      batch_size=batch_size, return_per_user=True)
    users = np.flatnonzero(tgt.any(1))
    assert 1 not in users
    assert_matches(summary, per_user, naive_full(scores, inp, tgt, ks), users)
    assert list(summary) == ([f"{m}@{k}" for m in ("recall", "ndcg", "hr") for k in ks] + ["mrr"]
                             + [f"precision@{k}" for k in ks] + ["n_users"])


def test_full_ties_are_consistent_and_pessimistic_for_mrr() -> None:
    inp_csr, tgt_csr, scores, inp, tgt = random_data(60, 80, seed=3, ties=True)
    ks = (1, 5, 10)
    _, per = evaluate_full(table_score_fn(scores), inp_csr, tgt_csr, ks=ks, return_per_user=True)
    for k in ks:  # the MRR rank agrees with the top-k hits, whatever order topk gave the ties
        np.testing.assert_array_equal(per[f"hr@{k}"] > 0, per["mrr"] >= 1 / k - 1e-12)
    for row, u in enumerate(per["user"]):
        if per["hr@10"][row] == 0:  # rank counted outside the top-k: ties go against the target
            best = scores[u][tgt[u]].max()
            ahead = int(((scores[u] >= best) & ~tgt[u] & ~inp[u]).sum())
            assert per["mrr"][row] == pytest.approx(1 / (ahead + 1))


def test_full_subset_of_users_and_metric_selection() -> None:
    inp_csr, tgt_csr, scores, _, _ = random_data(50, 60, seed=5)
    _, full = evaluate_full(table_score_fn(scores), inp_csr, tgt_csr, ks=(5,), return_per_user=True)
    pick = full["user"][::3]
    summary, sub = evaluate_full(table_score_fn(scores), inp_csr, tgt_csr, ks=(5,), users=pick,
                                 metrics=("ndcg", "mrr"), return_per_user=True)
    assert set(summary) == {"ndcg@5", "mrr", "n_users"}
    np.testing.assert_allclose(sub["ndcg@5"], full["ndcg@5"][::3])
    np.testing.assert_allclose(sub["mrr"], full["mrr"][::3])


def test_full_leaves_score_fn_tensors_alone() -> None:
    inp_csr, tgt_csr, scores, _, tgt = random_data(30, 40, seed=8)
    users = np.flatnonzero(tgt.any(1))
    cached = torch.from_numpy(scores[users].copy())  # a model's cache, returned as is

    def cached_fn(u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        assert np.array_equal(u.numpy(), users)
        return cached
    ref = evaluate_full(table_score_fn(scores), inp_csr, tgt_csr, ks=(5,))
    assert evaluate_full(cached_fn, inp_csr, tgt_csr, ks=(5,), batch_size=100) == ref
    np.testing.assert_array_equal(cached.numpy(), scores[users])  # history not written into it
    pop = torch.arange(40, dtype=torch.float32)  # an expanded (stride-0) view works too
    expanded = evaluate_full(lambda u, h: pop.expand(len(u), -1), inp_csr, tgt_csr, ks=(5,))
    assert expanded == evaluate_full(lambda u, h: pop.repeat(len(u), 1), inp_csr, tgt_csr, ks=(5,))


def test_full_target_scored_minus_inf_is_never_ranked() -> None:
    inp_csr, tgt_csr, scores, _, tgt = random_data(20, 40, seed=7)
    scores = scores.copy()
    scores[tgt] = -np.inf
    summary = evaluate_full(table_score_fn(scores), inp_csr, tgt_csr, ks=(5, 50))
    assert summary["hr@50"] == 0 and summary["mrr"] == 0


def test_full_targets_in_input_are_dropped_with_a_warning() -> None:
    inp_csr, tgt_csr, scores, inp, tgt = random_data(30, 40, seed=9)
    clean = evaluate_full(table_score_fn(scores), inp_csr, tgt_csr, ks=(5,))
    dirty = tgt_csr.tolil()
    dirty[2, np.flatnonzero(inp[2])[0]] = 1.0  # a target already in the input
    with pytest.warns(UserWarning, match="1 target entries of 1 users"):
        got = evaluate_full(table_score_fn(scores), inp_csr, dirty.tocsr(), ks=(5,))
    assert got == clean


def test_full_bad_input_raises() -> None:
    inp_csr, tgt_csr, scores, inp, _ = random_data(10, 12, seed=1)
    fn = table_score_fn(scores)
    with pytest.raises(ValueError, match=r"must return a \(\d+, 12\) tensor, got \(\d+, 5\)"):
        evaluate_full(lambda u, h: torch.zeros(len(u), 5), inp_csr, tgt_csr)
    nan = scores.copy()
    u = tgt_csr.getnnz(1).nonzero()[0][-1]
    nan[u, np.flatnonzero(inp[u])] = np.nan  # NaN on masked (history) items is harmless
    assert evaluate_full(table_score_fn(nan), inp_csr, tgt_csr) == evaluate_full(fn, inp_csr, tgt_csr)
    nan[u, np.flatnonzero(~inp[u])[-1]] = np.nan
    with pytest.raises(ValueError, match=f"NaN scores for user {u}"):
        evaluate_full(table_score_fn(nan), inp_csr, tgt_csr)
    with pytest.raises(ValueError, match="no target item .* user 1"):
        evaluate_full(fn, inp_csr, tgt_csr, users=[0, 1])
    with pytest.raises(ValueError, match="outside"):
        evaluate_full(fn, inp_csr, tgt_csr, users=[10])
    with pytest.raises(ValueError, match="shape"):
        evaluate_full(fn, inp_csr, tgt_csr[:, :5])
    with pytest.raises(TypeError, match="'target' must be a scipy.sparse"):
        evaluate_full(fn, inp_csr, tgt_csr.toarray())
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate_full(fn, inp_csr, tgt_csr, metrics=("map",))
    with pytest.raises(ValueError, match="ks must be"):
        evaluate_full(fn, inp_csr, tgt_csr, ks=(0,))
    with pytest.raises(ValueError, match="no user to evaluate"):
        evaluate_full(fn, inp_csr, sp.csr_matrix(tgt_csr.shape, dtype=np.float32))


# -------------------------------------------------------------------------------- sampled protocol

@pytest.mark.parametrize("sampling", ["uniform", "popularity"])
def test_sampled_matches_naive_loop_with_ties(sampling: str) -> None:
    inp_csr, tgt_csr, scores, inp, tgt = random_data(45, 70, seed=11, p_in=0.1, ties=True)
    users = np.flatnonzero(tgt.any(1))
    users = users[users != 0]  # user 0 has too few items left for 20 negatives
    ks = (1, 5, 10)
    summary, per = evaluate_sampled(table_score_fn(scores), inp_csr, tgt_csr, n_negatives=20, seed=4,
                                    ks=ks, sampling=sampling, users=users, batch_size=8,
                                    return_per_user=True)
    neg = sample_negatives(inp_csr, tgt_csr, users, 20, seed=4, sampling=sampling)
    assert_matches(summary, per, naive_sampled(scores, tgt, users, neg, ks), users)
    given = evaluate_sampled(table_score_fn(scores), inp_csr, tgt_csr, ks=ks, users=users,
                             negatives=_scatter(neg, users, inp_csr.shape[0]))
    assert given == summary


def _scatter(neg: np.ndarray, users: np.ndarray, n_users: int) -> np.ndarray:
    full = np.zeros((n_users, neg.shape[1]), dtype=np.int64)
    full[users] = neg
    return full


def test_sampled_constant_scores_rank_last() -> None:
    inp_csr = sp.csr_matrix(np.eye(30, 200, dtype=np.float32))  # history: item u
    tgt_csr = sp.csr_matrix(np.eye(30, 200, k=150, dtype=np.float32))  # target: item 150 + u
    out = evaluate_sampled(lambda u, h: torch.zeros(len(u), 200), inp_csr, tgt_csr, n_negatives=9, ks=(9, 10))
    assert out["hr@9"] == 0 and out["hr@10"] == 1 and out["n_users"] == 30  # rank N + 1 = 10
    assert out["mrr"] == pytest.approx(1 / 10) and out["ndcg@10"] == pytest.approx(1 / math.log2(11))


def test_sample_negatives_properties() -> None:
    inp_csr, tgt_csr, _, inp, tgt = random_data(80, 60, seed=13, p_in=0.3)
    users = np.arange(2, 80)
    pool = np.arange(10, 60)
    for sampling in ("uniform", "popularity"):
        neg = sample_negatives(inp_csr, tgt_csr, users, 15, seed=1, sampling=sampling, candidates=pool)
        assert neg.shape == (78, 15)
        assert all(len(set(r)) == 15 for r in neg)
        assert np.isin(neg, pool).all()
        assert not (inp | tgt)[users[:, None], neg].any()
        np.testing.assert_array_equal(neg, sample_negatives(inp_csr, tgt_csr, users, 15, seed=1,
                                                            sampling=sampling, candidates=pool))
        assert not np.array_equal(neg, sample_negatives(inp_csr, tgt_csr, users, 15, seed=2,
                                                        sampling=sampling, candidates=pool))
    with pytest.raises(ValueError, match=f"user 0 has only {(~inp[0] & ~tgt[0]).sum()} items"):
        sample_negatives(inp_csr, tgt_csr, [0], 5)
    with pytest.raises(ValueError, match="exceeds the 50 candidate"):
        sample_negatives(inp_csr, tgt_csr, users, 51, candidates=pool)


def test_sample_negatives_distributions() -> None:
    # 10 background users give items popularity w_i = i (item 0 never interacted: never drawn);
    # 4000 evaluated users have no history and target item 10, so every item 0..9 is allowed.
    n_bg, n_eval, n_items = 10, 4000, 11
    inp = np.zeros((n_bg + n_eval, n_items), dtype=np.float32)
    for i in range(1, 10):
        inp[:i, i] = 1
    tgt = np.zeros_like(inp)
    tgt[n_bg:, 10] = 1
    users = np.arange(n_bg, n_bg + n_eval)
    inp_csr, tgt_csr = sp.csr_matrix(inp), sp.csr_matrix(tgt)
    uni = np.bincount(sample_negatives(inp_csr, tgt_csr, users, 1, seed=0).ravel(), minlength=n_items)
    np.testing.assert_allclose(uni[:10] / n_eval, 0.1, atol=0.025)  # 5 sigma is about 0.024
    pop = np.bincount(sample_negatives(inp_csr, tgt_csr, users, 1, seed=0, sampling="popularity").ravel(),
                      minlength=n_items)
    assert pop[0] == 0 and pop[10] == 0
    np.testing.assert_allclose(pop[1:10] / n_eval, np.arange(1, 10) / 45, atol=0.03)


def test_sampled_given_negatives_are_checked() -> None:
    inp_csr, tgt_csr, scores, inp, tgt = random_data(10, 30, seed=17)
    fn = table_score_fn(scores)
    users = np.flatnonzero(tgt.any(1))
    neg = np.zeros((10, 3), dtype=np.int64)
    for u in users:  # hand-picked valid negatives
        neg[u] = np.flatnonzero(~inp[u] & ~tgt[u])[:3]
    evaluate_sampled(fn, inp_csr, tgt_csr, negatives=neg, ks=(1,))
    bad = neg.copy()
    u = users[1]
    bad[u, 0] = np.flatnonzero(tgt[u])[0]
    with pytest.raises(ValueError, match=f"negatives are target items .*user {u}"):
        evaluate_sampled(fn, inp_csr, tgt_csr, negatives=bad)
    # a caller that checked them once may skip the item test (not the shape and range tests)
    unchecked = evaluate_sampled(fn, inp_csr, tgt_csr, negatives=bad, ks=(1,), check_negatives=False)
    assert set(unchecked) >= {"hr@1", "mrr"}
    assert (evaluate_sampled(fn, inp_csr, tgt_csr, negatives=neg, ks=(1,), check_negatives=False)
            == evaluate_sampled(fn, inp_csr, tgt_csr, negatives=neg, ks=(1,)))
    bad[u, 0] = 30
    with pytest.raises(ValueError, match="outside"):
        evaluate_sampled(fn, inp_csr, tgt_csr, negatives=bad, check_negatives=False)
    with pytest.raises(ValueError, match="outside"):
        evaluate_sampled(fn, inp_csr, tgt_csr, negatives=bad)
    with pytest.raises(ValueError, match="shape"):
        evaluate_sampled(fn, inp_csr, tgt_csr, negatives=neg[:5])
    bad[u, 0] = np.flatnonzero(inp[u])[0]
    with pytest.warns(UserWarning, match="in their user's input"):
        evaluate_sampled(fn, inp_csr, tgt_csr, negatives=bad)


# ------------------------------------------------------------------------------------ distributed

def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        inp_csr, tgt_csr, scores, _, _ = random_data(37, 50, seed=21)
        seen: list[np.ndarray] = []
        table = table_score_fn(scores)

        def recording(users: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
            seen.append(users.numpy().copy())
            return table(users, history)
        full = evaluate_full(recording, inp_csr, tgt_csr, ks=(5, 10), batch_size=4,
                             distributed=True, return_per_user=True)
        np.save(Path(out_dir) / f"seen{rank}.npy", np.concatenate(seen))
        sampled = evaluate_sampled(table_score_fn(scores), inp_csr, tgt_csr, n_negatives=10, ks=(5,),
                                   users=np.arange(2, 37)[tgt_csr.getnnz(1)[2:] > 0], distributed=True,
                                   return_per_user=True)
        with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as f:
            pickle.dump((full, sampled), f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns 2 Python processes that import torch: 2-6 s on a 2-core machine
def test_distributed_two_gloo_processes_match_one(tmp_path: Path) -> None:
    import torch.multiprocessing as mp
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    inp_csr, tgt_csr, scores, _, _ = random_data(37, 50, seed=21)
    one_full = evaluate_full(table_score_fn(scores), inp_csr, tgt_csr, ks=(5, 10), return_per_user=True)
    one_sampled = evaluate_sampled(table_score_fn(scores), inp_csr, tgt_csr, n_negatives=10, ks=(5,),
                                   users=np.arange(2, 37)[tgt_csr.getnnz(1)[2:] > 0], return_per_user=True)
    seen = [np.load(tmp_path / f"seen{rank}.npy") for rank in range(2)]  # each rank scored its own shard
    np.testing.assert_array_equal(np.concatenate(seen), one_full[1]["user"])
    assert len(seen[0]) == len(seen[1]) + 1  # an odd number of users: uneven shards
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as f:
            full, sampled = pickle.load(f)
        for (summary, per), (ref_summary, ref_per) in ((full, one_full), (sampled, one_sampled)):
            assert summary.keys() == ref_summary.keys()
            for key in summary:
                assert summary[key] == pytest.approx(ref_summary[key], rel=1e-12, abs=1e-15)
            for key in ref_per:
                np.testing.assert_array_equal(per[key], ref_per[key])


# ------------------------------------------------------------------------------------- real data

def test_ml100k_leave_one_out_full_matches_naive_loop() -> None:
    import pandas as pd
    df = pd.read_csv(dataset_file("ml-100k/u.data"), sep="\t", names=["u", "i", "r", "t"])
    df["u"] -= 1
    df["i"] -= 1
    df = df.sort_values(["u", "t", "i"], kind="stable")
    last = df.groupby("u").tail(1)
    shape = (df.u.max() + 1, df.i.max() + 1)

    def csr(frame):
        return sp.csr_matrix((np.ones(len(frame), np.float32), (frame.u, frame.i)), shape=shape)
    train, test = csr(df.drop(last.index)), csr(last)
    pop = np.asarray(train.sum(0)).ravel().astype(np.float32)
    scores = np.broadcast_to(pop + np.random.default_rng(0).random(shape[1]).astype(np.float32) * 0.5,
                             shape).copy()  # popularity, distinct values
    ks = (10, 100)
    summary, per = evaluate_full(table_score_fn(scores), train, test, ks=ks, return_per_user=True)
    assert summary["n_users"] == 943
    assert_matches(summary, per, naive_full(scores, train.toarray() > 0, test.toarray() > 0, ks),
                   np.arange(943))
    assert 0.01 < summary["hr@10"] < 0.5


def test_lastfm_file_negatives_match_naive_loop() -> None:
    seqs = [line.split() for line in dataset_file("seq/LastFM.txt").read_text().splitlines()]
    negs = [line.split() for line in dataset_file("seq/LastFM_sample.txt").read_text().splitlines()]
    n_users = len(seqs)
    n_items = 1 + max(int(i) for s in seqs for i in s[1:])  # item ids are 1-based: keep 0 unused
    inp = sp.lil_matrix((n_users, n_items), dtype=np.float32)
    tgt = sp.lil_matrix((n_users, n_items), dtype=np.float32)
    for row, s in enumerate(seqs):
        assert int(s[0]) == row + 1
        inp[row, [int(i) for i in s[1:-1]]] = 1
        tgt[row, int(s[-1])] = 1
    neg = np.array([[int(i) for i in n[1:]] for n in negs], dtype=np.int64)
    inp, tgt = inp.tocsr(), tgt.tocsr()
    pop = np.asarray(inp.sum(0)).ravel().astype(np.float32)
    scores = np.broadcast_to(pop, (n_users, n_items)).copy()  # popularity: many ties
    summary, per = evaluate_sampled(table_score_fn(scores), inp, tgt, negatives=neg, ks=(1, 5, 10),
                                    return_per_user=True)
    users = np.arange(n_users)
    assert_matches(summary, per, naive_sampled(scores, tgt.toarray() > 0, users, neg, (1, 5, 10)), users)
    assert summary["hr@10"] > 0.1  # popularity is far better than chance (0.1) on LastFM


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    inp_csr, tgt_csr, scores, _, _ = random_data(300, 500, seed=23)
    table = torch.from_numpy(scores).cuda()

    def on_gpu(users: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        assert users.is_cuda and history.is_cuda
        return table[users]
    users = np.arange(2, 300)[tgt_csr.getnnz(1)[2:] > 0]
    for evaluate, kw in ((evaluate_full, {"ks": (5, 50)}), (evaluate_sampled, {"ks": (5,), "users": users})):
        gpu = evaluate(on_gpu, inp_csr, tgt_csr, device="cuda", batch_size=64, return_per_user=True, **kw)
        cpu = evaluate(table_score_fn(scores), inp_csr, tgt_csr, batch_size=64, return_per_user=True, **kw)
        assert gpu[0] == pytest.approx(cpu[0], abs=1e-12)
        for key in cpu[1]:
            np.testing.assert_allclose(gpu[1][key], cpu[1][key], atol=1e-12, err_msg=key)
