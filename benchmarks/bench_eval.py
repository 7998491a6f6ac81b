"""Full-ranking evaluation speed on ML-1M: fishertune vs a naive per-user loop vs RecBole's evaluator.

ML-1M (6,040 users x 3,706 items) is read with pandas from ``$FISHERTUNE_DATA/ml-1m/ratings.dat.gz``;
leave-one-out: each user's last rating by timestamp is the target, the rest is the history (masked).
Scores: a fixed random ``n_users x n_items`` table (``score_fn`` = a row lookup) or item popularity.
Metrics: recall/ndcg/hr/precision at 10, 20, 50, 100 and MRR. Timings: best of ``repeats`` runs.

Run: ``FISHERTUNE_DATA=... FISHERTUNE_PROGRESS=0 python benchmarks/bench_eval.py [--device cuda]
[--synthetic]`` (``--synthetic``: random data of ML-1M's shape, for machines without the dataset;
the naive loop and RecBole always run on the CPU). RecBole is used
when importable (e.g. run this script with a throwaway venv's python that has ``recbole`` and sees
the project's packages); otherwise its row says why it is missing.
"""

from __future__ import annotations

import argparse
import os
import math
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp
import torch

from common import best_time, ml1m_last_item  # noqa: E402 (benchmarks/ is on sys.path when run)
from fishertune.recsys.evaluate import evaluate_full

KS = (10, 20, 50, 100)






def naive_eval(scores: np.ndarray, train: sp.csr_matrix, test: sp.csr_matrix, users: np.ndarray) -> dict[str, float]:
    """The per-user Python loop a first implementation would write (numpy argsort per user)."""
    sums: dict[str, float] = {}
    for u in users:
        s = scores[u].astype(np.float64)
        s[train.indices[train.indptr[u]:train.indptr[u + 1]]] = -np.inf
        targets = set(test.indices[test.indptr[u]:test.indptr[u + 1]].tolist())
        order = np.argsort(-s, kind="stable")
        hits = [int(i) in targets for i in order[:max(KS)]]
        for k in KS:
            h = hits[:k]
            ideal = min(k, len(targets))
            dcg = sum(1 / math.log2(r + 2) for r, x in enumerate(h) if x)
            idcg = sum(1 / math.log2(r + 2) for r in range(ideal))
            for name, v in (("recall", sum(h) / ideal), ("ndcg", dcg / idcg), ("hr", float(any(h))),
                            ("precision", sum(h) / k)):
                sums[f"{name}@{k}"] = sums.get(f"{name}@{k}", 0.0) + v
        rank = 1 + int(np.flatnonzero(np.isin(order, list(targets)))[0])
        sums["mrr"] = sums.get("mrr", 0.0) + 1 / rank
    return {k: v / len(users) for k, v in sums.items()}


def recbole_eval(scores: torch.Tensor, train: sp.csr_matrix, test: sp.csr_matrix, batch_size: int = 1024
                 ) -> tuple[Callable[[], dict[str, float]], str]:
    """RecBole's Collector + Evaluator on our scores, as its full-sort trainer loop feeds them."""
    import recbole  # noqa: F401  (ImportError: reported by the caller)
    from recbole.evaluator import Collector, Evaluator

    note = f"recbole {recbole.__version__}"
    if not hasattr(np, "float"):  # RecBole 1.2.1's NDCG/MRR use np.float, removed in NumPy 1.24
        np.float = float  # type: ignore[attr-defined]
        note += "; np.float shim for NumPy 2"
    config = {"metrics": ["Recall", "NDCG", "Hit", "MRR", "Precision"], "topk": list(KS),
              "metric_decimal_place": 12, "eval_args": {"mode": "full"}, "device": "cpu"}
    users = np.flatnonzero(np.diff(test.indptr) > 0)
    batches = []  # RecBole's dataloader prepares these index tensors; built here, outside the timing
    for start in range(0, len(users), batch_size):
        ub = users[start:start + batch_size]
        h, t = train[ub].tocoo(), test[ub].tocoo()
        batches.append((torch.from_numpy(ub), (torch.from_numpy(h.row.astype(np.int64)),
                        torch.from_numpy(h.col.astype(np.int64))),
                        torch.from_numpy(t.row.astype(np.int64)), torch.from_numpy(t.col.astype(np.int64))))

    def run() -> dict[str, float]:
        collector, evaluator = Collector(config), Evaluator(config)
        for ub, hist_idx, pos_u, pos_i in batches:
            s = scores[ub]  # the model's full_sort_predict output
            s[hist_idx] = -np.inf  # RecBole's trainer masks the history so
            collector.eval_batch_collect(s, None, pos_u, pos_i)
        res = evaluator.evaluate(collector.get_data_struct())
        return {k.replace("hit@", "hr@"): float(v) for k, v in res.items()}
    return run, note


def synthetic_loo(n_users: int = 6040, n_items: int = 3706, per_user: int = 165,
                  seed: int = 0) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """ML-1M-shaped stand-in (for machines without the dataset): random histories, one target each."""
    rng = np.random.default_rng(seed)
    keys = rng.random((n_users, n_items))
    chosen = np.argpartition(keys, per_user, axis=1)[:, :per_user + 1]
    rows = np.repeat(np.arange(n_users), per_user)
    train = sp.csr_matrix((np.ones(rows.size, np.float32), (rows, chosen[:, :-1].ravel())), shape=(n_users, n_items))
    test = sp.csr_matrix((np.ones(n_users, np.float32), (np.arange(n_users), chosen[:, -1])), shape=(n_users, n_items))
    return train, test


def bench_eval(repeats: int = 5, naive_users: int = 600, batch_size: int = 1024, device: str = "cpu",
               synthetic: bool = False) -> list[dict[str, Any]]:
    """Rows ``{"method", "scores", "seconds", "users", "note", "metrics"}`` for ML-1M leave-one-out."""
    train, test = synthetic_loo() if synthetic else ml1m_last_item()
    n_users, n_items = train.shape
    table_cpu = torch.rand(n_users, n_items, generator=torch.Generator().manual_seed(0))
    table = table_cpu.to(device)
    pop = torch.from_numpy(np.asarray(train.sum(0)).ravel().astype(np.float32)).to(device)
    score_fns = {"random": lambda u, h: table[u], "popularity": lambda u, h: pop.expand(len(u), -1)}
    rows: list[dict[str, Any]] = []

    def ours_fn(fn: Callable, **kw: Any) -> Callable[[], dict[str, float]]:
        return lambda: evaluate_full(fn, train, test, ks=KS, batch_size=batch_size, device=device, **kw)
    ours_fn(score_fns["random"])()  # warm-up
    ours: dict[str, dict[str, float]] = {}
    threads = torch.get_num_threads()
    for n_threads in sorted({1, threads}) if device == "cpu" else [threads]:
        torch.set_num_threads(n_threads)
        for name, fn in score_fns.items():
            sec, res = best_time(ours_fn(fn), repeats)
            ours[name] = res
            rows.append({"method": "fishertune evaluate_full", "scores": name, "seconds": sec,
                         "users": res["n_users"], "metrics": res,
                         "note": f"{device}, batch_size={batch_size}, {n_threads} torch threads"})
    torch.set_num_threads(threads)
    subset = np.arange(naive_users)
    sec, res = best_time(lambda: naive_eval(table_cpu.numpy(), train, test, subset), 1)
    res_sub = ours_fn(score_fns["random"], users=subset)()
    rows.append({"method": "naive per-user loop", "scores": "random", "seconds": sec * n_users / naive_users,
                 "users": n_users, "metrics": res, "agrees_with_ours": max(abs(res[k] - res_sub[k]) for k in res),
                 "note": f"numpy, measured on the first {naive_users} users ({sec:.2f} s), extrapolated"})
    try:
        run, note = recbole_eval(table_cpu, train, test)
        sec, res = best_time(run, repeats)
        diff = {k: abs(res[k] - ours["random"][k]) for k in res if k in ours["random"]}
        rows.append({"method": "RecBole Collector+Evaluator", "scores": "random", "seconds": sec, "users": n_users,
                     "note": note + "; cpu; its MRR is MRR@k (top-k only), ours is over the full ranking",
                     "metrics": res, "agrees_with_ours": max(diff.values())})
    except ImportError as err:
        rows.append({"method": "RecBole Collector+Evaluator", "scores": "random", "seconds": float("nan"),
                     "users": n_users, "metrics": {},
                     "note": f"not importable here ({err}); `pip install torch==2.13.0 recbole` works in a "
                     "throwaway venv: run this script with that venv's python"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--synthetic", action="store_true", help="ML-1M-shaped random data instead of ML-1M")
    args = parser.parse_args()
    rows = bench_eval(device=args.device, synthetic=args.synthetic)
    data = "synthetic ML-1M-shaped data" if args.synthetic else "ML-1M"
    print(f"{data}, leave-one-out, full ranking, ks={KS}, recall/ndcg/hr/precision@k + mrr; torch "
          f"{torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} "
          f"(best of 5 runs; other processes on a shared machine inflate timings)")
    print(f"{'method':<30} {'scores':<11} {'seconds':>8} {'users':>6}  note")
    for r in rows:
        agree = f"; max |diff| vs ours {r['agrees_with_ours']:.1e}" if "agrees_with_ours" in r else ""
        print(f"{r['method']:<30} {r['scores']:<11} {r['seconds']:>8.3f} {r['users']:>6}  {r['note']}{agree}")
    seen = set()
    for r in rows:
        if r["metrics"] and (r["method"], r["scores"]) not in seen:
            seen.add((r["method"], r["scores"]))
            m, nan = r["metrics"], float("nan")
            where = f"first {int(r['note'].split('first ')[1].split()[0])} users" if "first" in r["note"] else "all"
            print(f"  {r['method']} ({r['scores']}, {where}): recall@20={m.get('recall@20', nan):.4f} "
                  f"ndcg@20={m.get('ndcg@20', nan):.4f} hr@100={m.get('hr@100', nan):.4f} "
                  f"mrr={m.get('mrr', nan):.4f} mrr@100={m.get('mrr@100', nan):.4f}")


if __name__ == "__main__":
    main()
