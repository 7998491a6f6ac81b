"""Fisher regularisation (EWC) and the online Fisher estimate from training gradients."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

__all__ = ["ewc_penalty", "OnlineFisher"]


def ewc_penalty(params: Mapping[str, Tensor], fisher: Mapping[str, Tensor], anchor: Mapping[str, Tensor],
                strength: float) -> Tensor:
    """``strength / 2 * sum_i F_i (theta_i - theta*_i)^2`` over the names in ``fisher`` (Kirkpatrick et
    al. 2017), differentiable in ``params``."""
    total: Tensor | None = None
    for n, f in fisher.items():
        p = params[n]
        term = (f.to(p.dtype) * (p - anchor[n]).pow(2)).sum()
        total = term if total is None else total + term
    if total is None:
        some = next(iter(params.values()))
        return torch.zeros((), dtype=some.dtype, device=some.device)
    return 0.5 * strength * total


class OnlineFisher:
    """Exponential moving average of squared training gradients (``fim_method="online"``):
    ``m <- d m + (1 - d) * scale * g^2`` in place after each backward (no extra pass), read
    bias-corrected as ``m / (1 - d^t)`` (the same correction as ``FisherStore.update``, which re-encodes
    on every update and is too heavy per step). ``scale`` is the batch size when known: the squared
    mean gradient times the batch size estimates the per-sample Fisher."""

    def __init__(self, params: Mapping[str, nn.Parameter], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"fim_ema_decay must be in [0, 1), got {decay}")
        self.params = dict(params)
        self.decay = float(decay)
        self.steps = 0
        self.m: dict[str, Tensor] = {n: torch.zeros_like(p, dtype=torch.float32 if p.dtype != torch.float64
                                                          else torch.float64) for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, scale: float = 1.0) -> None:
        d = self.decay
        for n, p in self.params.items():
            g = p.grad
            m = self.m[n]
            if g is None:
                m.mul_(d)
                continue
            if g.is_sparse:
                g = g.to_dense()
            m.mul_(d).addcmul_(g.to(m.dtype), g.to(m.dtype), value=(1 - d) * scale)
        self.steps += 1

    def get(self) -> dict[str, Tensor]:
        if self.steps == 0:
            return {n: torch.zeros_like(m) for n, m in self.m.items()}
        c = 1.0 - self.decay ** self.steps
        return {n: m / c for n, m in self.m.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "decay": self.decay, "m": {n: t.detach().cpu().clone() for n, t in self.m.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = int(state["steps"])
        for n, t in state["m"].items():
            self.m[n].copy_(t)
