"""Real wall-clock latency on CPU (or GPU): warm-up, repeats, median, fixed thread count.

Two models are timed interleaved (A, B, A, B, ...) so that machine-load drift hits both alike; the
speed-up is the ratio of the medians.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn


@contextlib.contextmanager
def _threads(n: int | None):
    old = torch.get_num_threads()
    try:
        if n is not None:
            torch.set_num_threads(int(n))
        yield
    finally:
        torch.set_num_threads(old)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_latency(models: Sequence[nn.Module], inputs: tuple, *, repeats: int = 20, warmup: int = 3,
                    threads: int | None = 1) -> list[dict[str, float]]:
    """Median / p10 / p90 seconds per forward of each model on ``inputs`` (eval mode, no gradients),
    interleaved; ``threads`` fixes ``torch.set_num_threads`` while timing (restored afterwards)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    if not models:
        raise ValueError("no model to time")
    times: list[list[float]] = [[] for _ in models]
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        device = next((p.device for p in models[0].parameters()), torch.device("cpu"))
        with _threads(threads):
            for _ in range(warmup):
                for m in models:
                    m(*inputs)
            _sync(device)
            for _ in range(repeats):
                for i, m in enumerate(models):
                    _sync(device)
                    t0 = time.perf_counter()
                    m(*inputs)
                    _sync(device)
                    times[i].append(time.perf_counter() - t0)
    finally:
        for m, t in zip(models, modes):
            m.train(t)
    out = []
    for ts in times:
        q = statistics.quantiles(ts, n=10) if len(ts) >= 2 else [ts[0]] * 9
        out.append({"median_s": statistics.median(ts), "p10_s": q[0], "p90_s": q[-1], "repeats": len(ts)})
    return out


def speedup(dense: nn.Module, compressed: nn.Module, inputs: tuple, **kwargs) -> dict[str, float]:
    """``{"dense_s", "compressed_s", "speedup"}``: medians and their ratio (see :func:`measure_latency`)."""
    a, b = measure_latency([dense, compressed], inputs, **kwargs)
    return {"dense_s": a["median_s"], "compressed_s": b["median_s"], "speedup": a["median_s"] / b["median_s"]}
