"""Fisher regularisation (EWC) and the online Fisher estimate from training gradients.

Both run once per optimizer step, so their per-step parts use ``torch._foreach_*`` ops over lists of
tensors (one C++ call per op instead of a Python loop per parameter; fused multi-tensor kernels on
the GPU; the one exception is :class:`EWCGradient`'s CPU path, see there) and never read a value
back to the host."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from fishertune.utils.foreach import foreach_into

__all__ = ["ewc_penalty", "EWCGradient", "OnlineFisher"]


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


class EWCGradient:
    """The gradient of :func:`ewc_penalty` without autograd: ``strength * F * (theta - theta*)``.

    Adding it to ``.grad`` after the loss' backward (:meth:`add_to_grads`) gives the same gradients as
    back-propagating ``loss + ewc_penalty(...)``, for two elementwise passes per parameter (a
    subtraction and a fused multiply-add) instead of the penalty's forward and backward graph (about
    eight passes and their temporaries). ``strength * F`` is computed once. :meth:`value` returns the
    penalty's value (no graph) and keeps the difference and gradient it computed, so the
    :meth:`add_to_grads` that follows in the same step reuses them while the parameters are unchanged
    (their in-place version counters say so).

    On the GPU the two terms are foreach ops into fresh tensors (the caching allocator makes them
    free; fused multi-tensor kernels). On the CPU they are written into two preallocated buffers
    (``torch.sub(..., out=)``, one call per parameter): the CPU foreach ops loop over the tensors in
    C++ anyway, and two fresh parameter-sized tensors per step cost page faults that tripled the
    EWC time in a profile (20k x 64 embedding: 7.6 ms -> 2.4 ms per step)."""

    def __init__(self, params: Mapping[str, Tensor], fisher: Mapping[str, Tensor], anchor: Mapping[str, Tensor],
                 strength: float):
        self.names = list(fisher)
        self.params = [params[n] for n in self.names]
        self.anchors = [anchor[n] for n in self.names]
        self.scaled = [(f.to(p.dtype) * strength).to(p.device) for f, p in zip(fisher.values(), self.params)]
        self._cache: tuple[list[int], list[Tensor], list[Tensor]] | None = None
        self._buffers: tuple[list[Tensor], list[Tensor]] | None = None
        if not any(p.is_cuda for p in self.params):
            self._buffers = ([torch.empty_like(p, memory_format=torch.contiguous_format) for p in self.params],
                             [torch.empty_like(p, memory_format=torch.contiguous_format) for p in self.params])

    def _terms(self) -> tuple[list[Tensor], list[Tensor]]:
        """``(d, g)``: ``d = theta - theta*`` and ``g = strength F d`` per parameter."""
        versions = [p._version for p in self.params]
        if self._cache is not None and self._cache[0] == versions:
            return self._cache[1], self._cache[2]
        bd, bg = self._buffers if self._buffers is not None else (None, None)
        with torch.no_grad():
            d = foreach_into("sub", self.params, self.anchors, bd)
            g = foreach_into("mul", d, self.scaled, bg)
        self._cache = (versions, d, g)
        return d, g

    def value(self) -> Tensor:
        """``strength / 2 * sum F (theta - theta*)^2`` (a 0-dim tensor, not differentiable)."""
        if not self.params:
            return torch.zeros(())
        d, g = self._terms()
        dots = [torch.dot(gi.reshape(-1), di.reshape(-1)) for gi, di in zip(g, d)]
        total = torch.stack(dots).sum() if len({t.dtype for t in dots}) == 1 else sum(dots[1:], dots[0])
        return 0.5 * total

    @torch.no_grad()
    def add_to_grads(self) -> None:
        """``grad += strength F (theta - theta*)``; a missing gradient becomes that term, a sparse one
        dense (as autograd accumulates a dense penalty gradient onto it)."""
        if not self.params:
            return
        _, g = self._terms()
        self._cache = None
        grads = [p.grad for p in self.params]
        if all(x is not None and not x.is_sparse for x in grads):
            torch._foreach_add_(grads, g)
            return
        for p, x, gi in zip(self.params, grads, g):
            if x is None:
                p.grad = gi.clone()           # never hand out a reused buffer as .grad
            elif x.is_sparse:
                p.grad = gi + x
            else:
                x.add_(gi)


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
        ms = list(self.m.values())
        grads = [p.grad for p in self.params.values()]
        if all(g is not None and not g.is_sparse and g.dtype == m.dtype for g, m in zip(grads, ms)):
            # the loop below, fused: the same ops on every tensor (bit-identical)
            torch._foreach_mul_(ms, d)
            torch._foreach_addcmul_(ms, grads, grads, value=(1 - d) * scale)
            self.steps += 1
            return
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
