"""Benchmark: reading ML-1M and its leave-one-out split, ours (vectorised) vs a per-user Python loop.

Run: ``FISHERTUNE_DATA=../shared/datasets python benchmarks/bench_split.py``. Both splits run in this
process on the same data and are checked equal before any time is reported. Target: < 1 s for ours.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from common import best_time  # benchmarks/ is on sys.path when run
from fishertune.recsys.data import Interactions, Split, leave_one_out, load_dataset


def loo_per_user_loop(inter: Interactions) -> tuple[sp.csr_matrix, sp.csr_matrix, sp.csr_matrix]:
    """The straightforward baseline: group rows by user, then for each user sort by (time, row) in Python."""
    by_user: dict[int, list[int]] = {}
    for k, u in enumerate(inter.users.tolist()):
        by_user.setdefault(u, []).append(k)
    t = inter.timestamps.tolist()
    train, valid, test = [], [], []
    for u, rows in by_user.items():
        rows.sort(key=lambda k: (t[k], k))
        if len(rows) >= 3:
            train += rows[:-2]
            valid.append(rows[-2])
            test.append(rows[-1])
        else:
            train += rows
    shape = (inter.n_users, inter.n_items)

    def mat(rows: list[int]) -> sp.csr_matrix:
        r = np.asarray(rows, dtype=np.int64)
        return sp.csr_matrix((np.ones(len(r), np.float32), (inter.users[r], inter.items[r])), shape=shape)

    return mat(train), mat(valid), mat(test)




def bench_split(repeat: int = 3) -> list[dict[str, Any]]:
    """Rows of {task, seconds, ...}: ML-1M read, our leave-one-out, the per-user loop, the speed-up."""
    t_read, inter = best_time(lambda: load_dataset("ml-1m"), repeat)
    t_ours, split = best_time(lambda: leave_one_out(inter), repeat)
    t_loop, (tr, va, te) = best_time(lambda: loo_per_user_loop(inter), 1)
    assert isinstance(split, Split)
    pairs = ((split.train, tr, "train"), (split.valid_target, va, "valid"), (split.test_target, te, "test"))
    for mine, ref, name in pairs:
        if (mine != ref).nnz:
            raise AssertionError(f"leave-one-out {name} differs from the per-user loop")
    n = len(inter)
    return [
        {"task": "read ml-1m (ratings.dat.gz)", "rows": n, "seconds": round(t_read, 4)},
        {"task": "leave_one_out ml-1m, vectorised (ours)", "rows": n, "seconds": round(t_ours, 4),
         "target_s": 1.0, "meets_target": t_ours < 1.0},
        {"task": "leave_one_out ml-1m, per-user Python loop", "rows": n, "seconds": round(t_loop, 4),
         "same_result": True},
        {"task": "speed-up (loop / ours)", "ratio": round(t_loop / t_ours, 1)},
    ]


if __name__ == "__main__":
    for row in bench_split():
        print(row)
