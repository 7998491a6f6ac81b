"""Helpers of the cross-domain tests: tiny synthetic pairs written to a data root."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_pair(root: Path, task: str = "dual-user-intra", pair: str = "aa_bb", n_users: int = 40,
               n_items: tuple[int, int] = (30, 24), seed: int = 0, shared_only: bool = True) -> Path:
    """``root/cdr/<task>/<a>_<b>`` and its sibling; every user has 3-7 training items per domain and one
    test item (a training item of someone else). dual-user-inter: valid/test users are cold-start."""
    rng = np.random.default_rng(seed)
    a, b = pair.split("_")
    folders = {}
    for k, (dom, other) in enumerate(((a, b), (b, a))):
        d = root / "cdr" / task / f"{dom}_{other}"
        d.mkdir(parents=True, exist_ok=True)
        folders[dom] = d
        n = n_items[k]
        train, test, valid = [], [], []
        cold = set(range(n_users - 6, n_users - 3)) if k == 0 else set(range(n_users - 3, n_users))
        for u in range(n_users):
            if task == "dual-user-inter" and u in cold:
                continue
            items = rng.choice(n, size=int(rng.integers(3, 8)), replace=False)
            train += [(u, int(i)) for i in items]
        if task == "dual-user-inter":
            for u in sorted(cold):
                t = rng.choice(n, size=2, replace=False)
                valid.append((u, int(t[0])))
                test.append((u, int(t[1])))
            if not shared_only:  # domain-only users beyond the shared ones
                train += [(n_users + k * 100 + j, int(rng.integers(n))) for j in range(5)]
        else:
            seen = {}
            for u, i in train:
                seen.setdefault(u, set()).add(i)
            for u in range(n_users):
                choices = [i for i in range(n) if i not in seen[u]]
                test.append((u, int(rng.choice(choices))))
        (d / "train.txt").write_text("".join(f"{u}\t{i}\t1\n" for u, i in train))
        (d / "test.txt").write_text("".join(f"{u}\t{i}\t1\n" for u, i in test))
        if task == "dual-user-inter":
            (d / "valid.txt").write_text("".join(f"{u}\t{i}\n" for u, i in valid))
    return folders[a]



TINY = ["model.dim=8", "model.max_len=4", "model.eval_max_len=16", "data.n_negatives=5", "data.domains=aa_bb",
        "train.batch_size=16", "train.epochs=2", "train.device=cpu", "train.patience=5", "eval.batch_size=7",
        "train.fisher_batches=2"]
