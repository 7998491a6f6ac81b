"""Diagonal Fisher on the CPU with and without micro-batches, against the naive per-sample loop, on the
SASRec-sized model of fisher_models.py (runs interleaved, best of ``--repeats``; samples per second).

    FISHERTUNE_PROGRESS=0 python benchmarks/fisher_microbatch.py [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    import fisher
    from fisher_models import build

    from fishertune.fisher import diagonal_fisher

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    case = build("sasrec", False, "cpu")
    n = sum(int(y.shape[0]) for _, y in case.batches)
    naive, _ = fisher.naive(case)
    runs = {"naive loop": naive}
    for m in (None, 16, 8, 4, "auto"):
        runs[f"engine micro_batch={m}"] = (lambda m=m: diagonal_fisher(
            case.model, case.batches, likelihood=case.likelihood, progress=False, micro_batch=m))
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    for name, t in best.items():
        print(f"{name:28s} {n / t:8.1f} samples/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
