"""Recommender perturbations x -> x' for FisherTune's domain-related Fisher, and its data hooks.

Data-level perturbations act on the users' *histories* (the contexts a batch's representations are
built from); the target items and negatives are left alone, so the loss still asks the same question
of a shifted input. Both keep every history a subset of the original one (never adding an item) and
keep shapes (dropped positions become padding).

- :class:`EdgeDropout` (``edge_dropout_rate`` r): every context interaction is dropped with
  probability r, independently. Magnitude ``(r, 0)``: r is the expected fraction of changed edges.
- :class:`PopularityReweighting` (``popularity_alpha`` a): interaction (u, i) is kept with probability
  ``min(1, (median_pop / pop_i) ** a)``, ``pop_i`` the item's number of training users in its domain:
  popular items are thinned, items below the median popularity always stay, so the perturbed histories
  follow a popularity-debiased distribution (resampling with weight ``pop^-a``, capped at one copy).
  ``a = 0`` is the identity. Magnitude ``(expected dropped fraction over the training interactions, 0)``.

Model-level ones come from :mod:`fishertune.tune.perturb`: noise injection and the feature-statistics
shift on the user-representation modules (``shared_agg`` and ``specific_agg.<domain>``, or
``perturbation_modules`` when given); ``combined`` applies edge dropout, popularity reweighting, noise
and feature shift together.

Fisher function: :func:`fishertune.tune.batch_gradient_fisher` over the model's own training loss
(one extra backward per Fisher batch, the cost of a training step). The engine's per-sample Fisher
(:func:`engine_fisher`) would need a categorical likelihood over each domain's 30-40k items per user
and per-sample gradients of 13M embedding entries (and the aggregators' custom contractions fall back to
``torch.func``), far more than FisherTune's budget of <= 1.2x the training time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fishertune.recsys.cdr.batches import CDRBatch
from fishertune.tune import (
    Combined,
    FeatureShift,
    NoiseInjection,
    Perturbation,
    batch_gradient_fisher,
    check_range,
)

__all__ = [
    "EdgeDropout",
    "PopularityReweighting",
    "fisher_batches_for",
    "fisher_fn_for",
    "make_perturbation",
    "user_modules",
]


def _device_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """A generator on ``device`` seeded from ``generator`` (which may live on the CPU)."""
    if generator is None:
        return None
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device).manual_seed(seed)


def _map(batch: Any, fn: Callable[[CDRBatch], CDRBatch]) -> Any:
    if isinstance(batch, CDRBatch):
        return fn(batch)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_map(b, fn) for b in batch)
    raise TypeError(f"expected a CDRBatch or a list of them, got {type(batch).__name__}")


class _HistoryPerturbation(Perturbation):
    """Drops context positions with a per-item keep probability; subclasses give the probability."""

    def __init__(self, n_items: tuple[int, ...]):
        self.n_items = tuple(int(n) for n in n_items)

    def keep_prob(self, domain: int, items: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _thin(self, domain: int, items: Tensor, w: Tensor | None, gen: torch.Generator | None):
        pad = self.n_items[domain]
        valid = items != pad
        p = self.keep_prob(domain, items.clamp(max=pad - 1))
        drop = valid & (torch.rand(items.shape, device=items.device, generator=gen) >= p)
        # no early return on ``not drop.any()``: asking would make the host wait for the device
        return items.masked_fill(drop, pad), (w.masked_fill(drop, 0.0) if w is not None else None)

    def batch(self, batch: Any, generator: torch.Generator) -> Any:
        def one(b: CDRBatch) -> CDRBatch:
            gen = _device_generator(generator, b.users.device)
            own, own_w = self._thin(b.domain, b.own, b.own_w, gen)
            shared, shared_w = [], []
            for e, c in enumerate(b.shared):
                c2, w2 = self._thin(e, c, b.shared_w[e] if b.shared_w is not None else None, gen)
                shared.append(c2)
                shared_w.append(w2)
            return b.replace(own=own, own_w=own_w, shared=tuple(shared),
                             shared_w=tuple(shared_w) if b.shared_w is not None else None)
        return _map(batch, one)


class EdgeDropout(_HistoryPerturbation):
    """Each history interaction dropped with probability ``rate`` (``rate = 0``: identity)."""

    name = "edge_dropout"

    def __init__(self, rate: float, n_items: tuple[int, ...]):
        super().__init__(n_items)
        self.rate = check_range("edge_dropout_rate", rate, 0.0, 1.0, high_open=True)

    def magnitude(self) -> tuple[float, float]:
        return (self.rate, 0.0)

    def keep_prob(self, domain: int, items: Tensor) -> Tensor:
        return torch.full(items.shape, 1.0 - self.rate, device=items.device)


class PopularityReweighting(_HistoryPerturbation):
    """Interaction (u, i) kept with probability ``min(1, (median_pop / pop_i) ** alpha)``."""

    name = "popularity"

    def __init__(self, alpha: float, popularity: list[np.ndarray], device: torch.device | str = "cpu"):
        super().__init__(tuple(len(p) for p in popularity))
        self.alpha = check_range("popularity_alpha", alpha, 0.0, 10.0)
        self.keep: list[Tensor] = []
        dropped, total = 0.0, 0.0
        for pop in popularity:
            pop = np.asarray(pop, dtype=np.float64)
            med = float(np.median(pop[pop > 0])) if (pop > 0).any() else 1.0
            keep = np.minimum(1.0, (med / np.maximum(pop, 1e-12)) ** self.alpha)
            keep[pop <= 0] = 1.0
            self.keep.append(torch.as_tensor(keep, dtype=torch.float32, device=device))
            dropped += float(((1 - keep) * pop).sum())
            total += float(pop.sum())
        self.dropped_fraction = dropped / total if total else 0.0

    def magnitude(self) -> tuple[float, float]:
        return (self.dropped_fraction, 0.0)

    def keep_prob(self, domain: int, items: Tensor) -> Tensor:
        keep = self.keep[domain]
        if keep.device != items.device:
            keep = self.keep[domain] = keep.to(items.device)
        return keep[items]


def user_modules(model) -> list[str]:
    """The modules whose outputs are the user representations (noise / feature-shift targets)."""
    return ["shared_agg", *[f"specific_agg.{d}" for d in model.domains]]


def make_perturbation(ctx) -> Perturbation | None:
    """The perturbation the config asks for, over this context's data and model."""
    ft = ctx.cfg.fishertune
    kind = ft.perturbation_type
    n_items = tuple(ctx.model.n_items)
    mods = list(ft.perturbation_modules) or user_modules(ctx.model)
    if kind == "none":
        return None
    if kind == "edge_dropout":
        return EdgeDropout(ft.edge_dropout_rate, n_items)
    pop = [np.asarray(ctx.data[d].train.sum(0)).ravel() for d in ctx.data.domains]
    if kind == "popularity":
        return PopularityReweighting(ft.popularity_alpha, pop, ctx.device)
    if kind == "noise":
        return NoiseInjection(mods, ft.perturbation_noise_std)
    if kind == "feature_shift":
        return FeatureShift(mods, ft.feature_shift_mu, ft.feature_shift_sigma)
    if kind == "combined":
        parts: list[Perturbation] = []
        if ft.edge_dropout_rate > 0:
            parts.append(EdgeDropout(ft.edge_dropout_rate, n_items))
        if ft.popularity_alpha > 0:
            parts.append(PopularityReweighting(ft.popularity_alpha, pop, ctx.device))
        if ft.perturbation_noise_std > 0:
            parts.append(NoiseInjection(mods, ft.perturbation_noise_std))
        if ft.feature_shift_mu > 0 or ft.feature_shift_sigma > 0:
            parts.append(FeatureShift(mods, ft.feature_shift_mu, ft.feature_shift_sigma))
        return Combined(parts) if parts else None
    raise ValueError(f"unknown perturbation_type {kind!r}")


def fisher_fn_for(ctx, autocast: Callable[[], AbstractContextManager] = nullcontext) -> Callable:
    """``batch_gradient_fisher`` over the training loss of one step (a batch per domain), its forward
    run inside ``autocast()`` (e.g. the trainer's bfloat16 autocast; the gradients stay float32)."""

    def step_loss(model, steps: list[CDRBatch]) -> Tensor:
        with autocast():
            return sum(model(b) for b in steps)

    return batch_gradient_fisher(step_loss, batch_size_fn=lambda steps: len(steps[0]))


def fisher_batches_for(ctx, seed: int) -> Callable[[], Iterable[list[CDRBatch]]]:
    """``train.fisher_batches`` training steps (one batch per domain each), the same ones at every call:
    F(x) and F(x') must see the same data."""
    n = ctx.cfg.train.fisher_batches

    def batches() -> Iterable[list[CDRBatch]]:
        gen = torch.Generator(ctx.device).manual_seed(seed * 7_919 + 17)
        it = ctx.sampler.epoch(gen)
        return [next(it) for _ in range(min(n, len(ctx.sampler)))]

    return batches
