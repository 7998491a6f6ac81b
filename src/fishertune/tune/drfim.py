"""The domain-related Fisher (DR-FIM), its variational stabilisation and importance normalisation.

DR-FIM (Zhao et al., CVPR 2025, FisherTune) per parameter entry::

    DR = F(x)/s + exp(-(eps_mu + eps_sigma)) * |F(x) - F(x')| / (min(F(x), F(x')) + floor + eps * s)

``F(x')`` is the Fisher on perturbed data, ``(eps_mu, eps_sigma)`` the perturbation sizes. ``s`` is
the Fisher scale of the parameter's group (``fisher_scale="mean"``: the group mean of ``F(x)``;
``"raw"``: 1, the paper's literal formula). With ``"mean"`` both terms are dimensionless, so the
balance between "important" (first term) and "domain-sensitive" (second term) does not depend on
the loss scale, and ``eps`` is relative. ``floor`` is 0, or ``gamma / tau^2`` with the variational
estimate: the relative change is then taken between posterior precisions
``Lambda = F / gamma + 1 / tau^2`` (see :func:`posterior_std`), which damps the huge relative changes of
entries whose Fisher is at noise level. With ``x' = x`` the second term is exactly 0.
"""

from __future__ import annotations

import math
import warnings
from typing import Mapping, Sequence

import torch
from torch import Tensor

from fishertune.utils.foreach import to_floats

__all__ = ["dr_fim", "group_scales", "posterior_std", "variational_floor", "normalize_importance",
           "masks_from_importance", "quantile_summary", "strict_ranks"]


def group_scales(fisher: Mapping[str, Tensor], groups: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Per parameter name: the mean Fisher of its group (1.0 where the group's Fisher is all zero)."""
    out: dict[str, float] = {}
    for names in groups.values():
        total = sum(to_floats([fisher[n].double().sum() for n in names]))
        count = sum(fisher[n].numel() for n in names)
        mean = total / count if count else 0.0
        for n in names:
            out[n] = mean if mean > 0 and math.isfinite(mean) else 1.0
    return out


def dr_fim(fisher: Mapping[str, Tensor], perturbed: Mapping[str, Tensor] | None, magnitude: tuple[float, float],
           *, scale: Mapping[str, float] | None = None, floor: float = 0.0, eps: float = 1e-8
           ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(DR-FIM, extra term)`` per parameter (see the module docstring); ``perturbed=None``: the extra
    term is zero and DR-FIM is ``F / s``."""
    if floor < 0 or eps < 0:
        raise ValueError("floor and eps must be >= 0")
    w = math.exp(-(float(magnitude[0]) + float(magnitude[1])))
    dr: dict[str, Tensor] = {}
    extra: dict[str, Tensor] = {}
    for n, f in fisher.items():
        s = float(scale[n]) if scale is not None else 1.0
        base = f / s
        if perturbed is None:
            dr[n], extra[n] = base, torch.zeros_like(f)
            continue
        fp = perturbed[n].to(f.device, f.dtype)
        if fp.shape != f.shape:
            raise ValueError(f"perturbed Fisher of {n!r} has shape {tuple(fp.shape)}, expected {tuple(f.shape)}")
        e = w * (f - fp).abs() / (torch.minimum(f, fp) + (floor + eps * s))
        dr[n], extra[n] = base + e, e
    return dr, extra


def variational_floor(tau: float, gamma: float) -> float:
    """Prior precision in Fisher units, ``gamma / tau^2`` (0 when ``tau`` is infinite)."""
    if tau <= 0 or gamma < 0:
        raise ValueError(f"need variational_tau > 0 and variational_gamma >= 0, got {tau}, {gamma}")
    return gamma / tau ** 2


def posterior_std(fisher: Tensor, tau: float, gamma: float) -> Tensor:
    """Std of the diagonal Gaussian posterior ``q = N(theta, s^2)`` that minimises
    ``E_q[L] + gamma * KL(q || N(theta0, tau^2))`` under the local quadratic model of ``L`` with
    curvature ``F``: ``1/s^2 = F/gamma + 1/tau^2`` (so ``s <= tau``)."""
    if tau <= 0 or gamma <= 0:
        raise ValueError(f"need variational_tau > 0 and variational_gamma > 0, got {tau}, {gamma}")
    return (fisher.float() / gamma + 1.0 / tau ** 2).rsqrt().to(fisher.dtype)


def normalize_importance(values: Mapping[str, Tensor], groups: Mapping[str, Sequence[str]],
                         mode: str = "rank") -> dict[str, Tensor]:
    """Importance in [0, 1] per entry, normalised within each group.

    ``"rank"``: the fraction of the group's *other* entries with a strictly smaller value
    (``#{v_j < v_i} / (n - 1)``): the largest entry gets 1, ties share the lower rank (an all-zero
    block stays at the bottom), and a threshold ``delta`` keeps roughly the top ``1 - delta`` of the
    group. ``"max"``: ``v / max(v)`` of the group."""
    if mode not in ("rank", "max"):
        raise ValueError(f"importance_normalization must be 'rank' or 'max', got {mode!r}")
    out: dict[str, Tensor] = {}
    for names in groups.values():
        if not names:
            continue
        flat = torch.cat([values[n].detach().reshape(-1).float() for n in names])
        n_all = flat.numel()
        if mode == "max":
            top = float(flat.max()) if n_all else 0.0
            norm = flat / top if top > 0 else torch.zeros_like(flat)
        elif n_all == 1:
            norm = torch.ones_like(flat)
        else:
            norm = strict_ranks(flat).float() / (n_all - 1)
        start = 0
        for n in names:
            k = values[n].numel()
            out[n] = norm[start:start + k].reshape(values[n].shape)
            start += k
    return out


def strict_ranks(flat: Tensor) -> Tensor:
    """Per entry of the 1-D ``flat``: how many entries are strictly smaller (int64).

    Equal to ``torch.searchsorted(torch.sort(flat).values, flat, right=False)`` for values without NaN,
    from one sort: the sorted position of the first entry of each run of equal values, spread over the
    run by a running maximum and scattered back. About 2.5x faster on the CPU than the binary search
    per entry (which misses the cache on every step for a million entries)."""
    n = flat.numel()
    srt, order = torch.sort(flat)
    starts = torch.ones(n, dtype=torch.bool, device=flat.device)
    if n > 1:
        torch.ne(srt[1:], srt[:-1], out=starts[1:])
    pos = torch.arange(n, device=flat.device)
    first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(0).values
    out = torch.empty_like(first)
    out[order] = first
    return out


def masks_from_importance(importance: Mapping[str, Tensor], groups: Mapping[str, Sequence[str]],
                          thresholds: Mapping[str, float], warn: bool = True) -> dict[str, Tensor]:
    """``importance >= delta`` per group; a group where nothing is selected gives a warning naming it."""
    masks: dict[str, Tensor] = {}
    for g, names in groups.items():
        d = float(thresholds[g])
        for n in names:
            masks[n] = importance[n] >= d
        if warn and names and not any(to_floats([masks[n].any() for n in names])):
            warnings.warn(f"FisherTune: threshold {d:.4f} selects no parameter in group {g!r}; the whole group is "
                          f"frozen this epoch (lower {g}_delta_max/{g}_delta_min)", RuntimeWarning, stacklevel=2)
    return masks


def quantile_summary(tensors: Sequence[Tensor], prefix: str, max_elems: int = 1 << 20) -> dict[str, float]:
    """Mean, max and quantiles (10/50/90/99 %) of the entries of ``tensors`` (a deterministic strided
    subsample above ``max_elems`` entries)."""
    if not tensors:
        return {}
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    stats = [flat.double().mean(), flat.max()]
    if flat.numel() > max_elems:
        flat = flat[:: math.ceil(flat.numel() / max_elems)]
    last = flat.numel() - 1
    qs = (0.1, 0.5, 0.9, 0.99)
    # the k-th smallest by selection (O(n)), the same value as sort(flat)[k] without the full sort
    stats += [torch.kthvalue(flat, min(last, int(q * last + 0.5)) + 1).values for q in qs]
    values = to_floats(stats)  # one wait for the device, not six
    out = {f"{prefix}_mean": values[0], f"{prefix}_max": values[1]}
    out.update({f"{prefix}_q{int(round(q * 100))}": v for q, v in zip(qs, values[2:])})
    return out
