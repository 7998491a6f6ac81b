"""Helpers shared by the benchmark scripts: best-of-N timing and ML-1M through the data layer."""

from __future__ import annotations

import time
from typing import Any, Callable

import scipy.sparse as sp

from fishertune.recsys.data import leave_one_out, load_dataset


def best_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Shortest wall time of ``repeats`` calls, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def ml1m_last_item() -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """``(history, target)``: every ML-1M user's last item by time is the target, the rest history."""
    split = leave_one_out(load_dataset("ml-1m"))
    return split.test_input, split.test_target


def ml1m_binary(min_rating: float = 4) -> sp.csr_matrix:
    """All ML-1M users x items, 1 where the rating is >= ``min_rating`` (shape kept: 6,040 x 3,706)."""
    inter = load_dataset("ml-1m")
    return inter.take(inter.ratings >= min_rating).to_csr()
