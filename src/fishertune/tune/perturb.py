"""Perturbations x -> x' for the domain-related Fisher (DR-FIM): F(x) is contrasted with F(x').

A :class:`Perturbation` acts at two levels, both optional:

- data level: :meth:`Perturbation.batch` returns a perturbed copy of a batch (identity here;
  recommender perturbations such as edge dropout live in ``fishertune.recsys`` as subclasses);
- model level: :meth:`Perturbation.context` installs forward hooks that perturb the outputs of named
  modules while the Fisher pass runs (:class:`NoiseInjection`, :class:`FeatureShift`).

:meth:`Perturbation.magnitude` returns ``(eps_mu, eps_sigma)``, the sizes that weight the DR-FIM term by
``exp(-(eps_mu + eps_sigma))``. A caller that wants reproducible draws sets ``perturbation.generator``
(the tuner does, before every pass); model-level hooks draw from it.

Output hooks are moved behind every other forward hook of the module when it runs, so hooks that read
the module's own output (the Fisher engine's per-sample gradient taps, K-FAC) see the unperturbed
output and the gradient that flows through the perturbation: the Fisher of the perturbed network is
exact also when the perturbed module owns parameters.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = ["Perturbation", "NoiseInjection", "FeatureShift", "Combined", "check_range", "match_modules"]


def check_range(key: str, value: float, low: float, high: float, low_open: bool = False,
                high_open: bool = False) -> float:
    """``value`` if it lies in the range, else a ValueError naming ``key`` and the range."""
    v = float(value)
    ok_low = v > low if low_open else v >= low
    ok_high = v < high if high_open else v <= high
    if not (ok_low and ok_high) or math.isnan(v):
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{key} must be in {lo}{low}, {high}{hi}, got {value}")
    return v


def match_modules(model: nn.Module, patterns: Sequence[str], owner: str = "perturbation") -> dict[str, nn.Module]:
    """Modules whose names match any glob pattern (``fnmatch``, case-sensitive); a pattern matching
    nothing is an error listing candidate names."""
    if isinstance(patterns, str):
        patterns = [patterns]
    named = {n: m for n, m in model.named_modules() if n}
    out: dict[str, nn.Module] = {}
    missing = []
    for pat in patterns:
        hits = {n: m for n, m in named.items() if fnmatch.fnmatchcase(n, pat)}
        if not hits:
            missing.append(pat)
        out.update(hits)
    if missing:
        raise ValueError(f"{owner}: module pattern(s) {missing} match no module; names are e.g. {list(named)[:12]}")
    return out


class Perturbation:
    """Identity perturbation; subclasses override :meth:`batch` and/or :meth:`_perturb_output`."""

    name: str = "none"
    generator: torch.Generator | None = None

    def magnitude(self) -> tuple[float, float]:
        """``(eps_mu, eps_sigma)``: sizes of the mean and scale shift (0, 0 for the identity)."""
        return (0.0, 0.0)

    def batch(self, batch: Any, generator: torch.Generator) -> Any:  # noqa: ARG002
        """Data-level perturbation of one batch (identity here)."""
        return batch

    def context(self, model: nn.Module) -> contextlib.AbstractContextManager:  # noqa: ARG002
        """Model-level perturbation while the context is open (none here)."""
        return contextlib.nullcontext()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, magnitude={self.magnitude()})"


class _OutputHook(Perturbation):
    """Base of perturbations that rewrite the outputs of modules matched by glob patterns."""

    def __init__(self, modules: Sequence[str]):
        self.modules = [modules] if isinstance(modules, str) else list(modules)
        if not self.modules:
            raise ValueError(f"{type(self).__name__} needs at least one module pattern")

    def _perturb_output(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _noise(self, shape: Sequence[int], like: Tensor) -> Tensor:
        g = self.generator
        if g is not None and g.device != like.device:
            z = torch.randn(tuple(shape), generator=g, dtype=like.dtype, device=g.device).to(like.device)
        else:
            z = torch.randn(tuple(shape), generator=g, dtype=like.dtype, device=like.device)
        return z

    def _apply(self, output: Any) -> Any:
        if isinstance(output, Tensor):
            return self._perturb_output(output) if output.is_floating_point() else output
        if isinstance(output, (tuple, list)):
            return type(output)(self._apply(o) for o in output)
        return output

    @contextlib.contextmanager
    def _hooks(self, model: nn.Module) -> Iterator[None]:
        mods = match_modules(model, self.modules, type(self).__name__)
        handles = []
        try:
            for m in mods.values():
                fh = m.register_forward_hook(lambda _m, _a, out: self._apply(out))
                hid = fh.id

                def move_last(module: nn.Module, _args: Any, hid: int = hid) -> None:
                    hooks = getattr(module, "_forward_hooks", None)
                    if hooks is not None and hid in hooks and hasattr(hooks, "move_to_end"):
                        hooks.move_to_end(hid)

                handles += [fh, m.register_forward_pre_hook(move_last)]
            yield
        finally:
            for h in handles:
                h.remove()

    def context(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return self._hooks(model)


class NoiseInjection(_OutputHook):
    """Gaussian noise ``N(0, std^2)`` added to the outputs of the modules matching ``modules`` (globs).
    Magnitude ``(0, std)``. ``std = 0`` is the identity."""

    name = "noise"

    def __init__(self, modules: Sequence[str], std: float):
        super().__init__(modules)
        self.std = check_range("perturbation_noise_std", std, 0.0, math.inf, high_open=True)

    def magnitude(self) -> tuple[float, float]:
        return (0.0, self.std)

    def _perturb_output(self, t: Tensor) -> Tensor:
        if self.std == 0:
            return t
        return t + self.std * self._noise(t.shape, t)


class FeatureShift(_OutputHook):
    """The feature-statistics shift: each output vector (over ``dim``, per sample and position) is
    standardised with its own mean ``mu`` and std ``sigma`` and re-scaled with perturbed statistics

        mu' = mu + eps_mu * sigma * z_mu,     sigma' = sigma * exp(eps_sigma * z_sigma)

    with ``z ~ N(0, 1)`` per vector (``random=True``, from ``self.generator``) or ``z = 1``
    (``random=False``: the output then has exactly the stated mean and std). Sizes are relative to the
    vector's own std, so they do not depend on the feature scale. ``eps_mu = eps_sigma = 0`` is the
    identity. Vectors with zero std get only the mean shift."""

    name = "feature_shift"

    def __init__(self, modules: Sequence[str], eps_mu: float, eps_sigma: float, random: bool = True,
                 dim: int = -1, eps: float = 1e-6):
        super().__init__(modules)
        self.eps_mu = check_range("feature_shift_mu", eps_mu, 0.0, math.inf, high_open=True)
        self.eps_sigma = check_range("feature_shift_sigma", eps_sigma, 0.0, math.inf, high_open=True)
        self.random, self.dim, self.eps = random, dim, eps

    def magnitude(self) -> tuple[float, float]:
        return (self.eps_mu, self.eps_sigma)

    def _perturb_output(self, t: Tensor) -> Tensor:
        if self.eps_mu == 0 and self.eps_sigma == 0:
            return t
        mu = t.mean(dim=self.dim, keepdim=True)
        sigma = t.var(dim=self.dim, keepdim=True, unbiased=False).add(self.eps ** 2).sqrt()
        if self.random:
            z_mu, z_sigma = self._noise(mu.shape, t), self._noise(mu.shape, t)
        else:
            z_mu = z_sigma = torch.ones_like(mu)
        new_mu = mu + self.eps_mu * sigma * z_mu
        new_sigma = sigma * torch.exp(self.eps_sigma * z_sigma)
        return (t - mu) / sigma * new_sigma + new_mu


class Combined(Perturbation):
    """Several perturbations at once: batches pass through each in order, all hooks are installed,
    magnitudes add."""

    name = "combined"

    def __init__(self, parts: Sequence[Perturbation]):
        self.parts = list(parts)
        if not self.parts:
            raise ValueError("Combined needs at least one perturbation")

    def magnitude(self) -> tuple[float, float]:
        mags = [p.magnitude() for p in self.parts]
        return (float(sum(m[0] for m in mags)), float(sum(m[1] for m in mags)))

    def batch(self, batch: Any, generator: torch.Generator) -> Any:
        for p in self.parts:
            batch = p.batch(batch, generator)
        return batch

    @contextlib.contextmanager
    def _ctx(self, model: nn.Module) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for p in self.parts:
                p.generator = self.generator
                stack.enter_context(p.context(model))
            yield

    def context(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return self._ctx(model)

