"""Threshold schedules for progressive parameter selection.

``delta(t)`` moves from ``delta_max`` (few parameters train) to ``delta_min`` (more train) over the
tuning epochs; :class:`AdaptiveOffset` shifts it with the validation trend.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

__all__ = ["delta_at", "AdaptiveOffset"]


def delta_at(t: int, span: int, delta_max: float, delta_min: float, shape: str = "linear") -> float:
    """Threshold at tuning epoch ``t`` (0 = first epoch after warm-up) of ``span`` tuning epochs.

    ``t = 0`` gives ``delta_max``; ``t >= span - 1`` gives ``delta_min`` (``span = 1``: ``delta_min``
    at once). ``shape``: ``"linear"`` or ``"cosine"`` (half cosine: slow, fast, slow)."""
    if span < 1:
        raise ValueError(f"span must be >= 1, got {span}")
    if t < 0:
        raise ValueError(f"t must be >= 0, got {t}")
    p = 1.0 if span == 1 else min(1.0, t / (span - 1))
    if shape == "linear":
        frac = p
    elif shape == "cosine":
        frac = (1.0 - math.cos(math.pi * p)) / 2.0
    else:
        raise ValueError(f"threshold_schedule must be 'linear' or 'cosine', got {shape!r}")
    if p == 1.0:
        return float(delta_min)
    return float(delta_max - (delta_max - delta_min) * frac)


class AdaptiveOffset:
    """Moves the thresholds with the validation trend (``use_adaptive_scheduler``).

    After each tuning epoch with the metric present: if it improved on the best value seen so far the
    offset decreases by ``rate`` (training goes well: let more parameters train); otherwise (stall or
    worse) it increases by ``rate`` (freeze more: guards sparse domains against over-fitting). The offset
    is added to every group's ``delta(t)``, the sum clipped to [0, 1]; the offset itself stays in
    [-1, 1]."""

    def __init__(self, rate: float, mode: str = "min"):
        if mode not in ("min", "max"):
            raise ValueError(f"scheduler_mode must be 'min' or 'max', got {mode!r}")
        self.rate, self.mode = float(rate), mode
        self.offset = 0.0
        self.best: float | None = None

    def update(self, value: float) -> float:
        v = float(value)
        improved = self.best is None or (v < self.best if self.mode == "min" else v > self.best)
        if self.best is not None:
            self.offset += -self.rate if improved else self.rate
            self.offset = min(1.0, max(-1.0, self.offset))
        if improved:
            self.best = v
        return self.offset

    def apply(self, delta: float) -> float:
        return min(1.0, max(0.0, delta + self.offset))

    def state_dict(self) -> dict[str, Any]:
        return {"offset": self.offset, "best": self.best}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.offset, self.best = float(state["offset"]), state["best"]
