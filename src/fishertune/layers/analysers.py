"""Block-importance analysers behind one registry (:func:`register_analyser`, :func:`analyse`).

Each analyser scores every block of a :class:`~fishertune.layers.task.LayerTask` from its calibration
data (higher = more important, i.e. kept longer) and returns an :class:`Importance`, which chooses the
blocks to drop for a given count. Cost is in passes over the calibration data (F = forward only,
FB = forward + backward); analysers that share a pass compute it once per :class:`Context`.

| method | score of block b | cost |
|---|---|---|
| ``fisher_sum`` / ``fisher_mean`` | sum / mean over b's parameters of the engine's diagonal Fisher (:func:`fishertune.fisher.diagonal_fisher`) | 1 FB (shared) |
| ``gate_fisher`` | Fisher of a scalar gate g on b's residual branch, ``y = s(x) + g (B(x) - s(x))`` at g = 1, ``E[(dl/dg)^2]`` | 1 FB (shared) |
| ``gate_taylor`` | predicted loss increase when the gate goes 1 -> 0: ``-E[dl/dg] + E[(dl/dg)^2] / 2`` | same pass as ``gate_fisher`` |
| ``grad_norm`` | norm of the mean loss gradient over b's parameters | 1 FB (shared) |
| ``taylor`` | first-order loss change when b's weights are zeroed, ``abs(sum theta * mean grad)`` | same pass as ``grad_norm`` |
| ``ablation`` | calibration-metric drop when b alone is removed | N + 1 F |
| ``greedy`` | iterative removal (SLEB-like): each step removes the block whose removal keeps the best calibration metric; the order is the plan | sum over steps of the blocks left, F |
| ``block_influence`` | ShortGPT's ``1 - cos(s(x), B(x))`` averaged over tokens | 1 F (shared) |
| ``angular`` | Gromov et al.: ``arccos(cos(S(x_l), x_{l+n})) / pi`` of a contiguous run of n blocks; the plan for n blocks is the run with the smallest distance (its score per block: n = 1) | same pass as ``block_influence`` |
| ``last`` | baseline: drop the last blocks | 0 |
| ``random[:seed]`` | baseline: a seeded random order | 0 |

``s`` is what the block becomes when removed (identity, or the ResNet down-sampling shortcut), so a
block whose output equals ``s(x)`` scores zero under ``block_influence``, ``gate_*`` and ``ablation``.
Hidden states are compared per token along the feature dimension (channels of a ``B x C x H x W`` map,
the last dimension otherwise), padding excluded through ``task.token_mask``; Gromov et al. use the
last token of a causal model, here all real tokens are averaged.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fishertune.layers.blocks import Block, _get, block_parameters, blocks_removed, first_tensor, shortcut
from fishertune.layers.task import LayerTask


@dataclass
class Importance:
    """Scores per block (higher = more important) and how to choose k blocks to drop.

    ``order``: removal order of iterative methods (first = removed first); ``windows``: for ``angular``,
    ``{n: [(distance, start), ...] sorted}``. ``cost``: passes over the calibration data."""

    method: str
    blocks: list[str]
    scores: dict[str, float]
    cost: str = ""
    seconds: float = 0.0
    order: list[str] | None = None
    windows: dict[int, list[tuple[float, int]]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def removal_order(self) -> list[str]:
        if self.order is not None:
            return list(self.order)
        pos = {b: i for i, b in enumerate(self.blocks)}
        return sorted(self.blocks, key=lambda b: (self.scores[b], pos[b]))

    def choose(self, k: int, feasible: Callable[[list[str]], bool] | None = None) -> list[str] | None:
        """The ``k`` blocks to drop (in model order); with ``feasible``, the best candidate it accepts
        (``None`` if there is none). Score methods drop the k lowest scores, iterative methods the first
        k of their order, ``angular`` the contiguous run of k with the smallest distance."""
        n = len(self.blocks)
        if not 0 <= k <= n:
            raise ValueError(f"cannot remove {k} of {n} blocks")
        if k == 0:
            return [] if feasible is None or feasible([]) else None
        if self.windows is not None:
            for _, start in self.windows.get(k, []):
                cand = self.blocks[start:start + k]
                if feasible is None or feasible(cand):
                    return cand
            return None
        order = self.removal_order()
        if k > len(order):
            raise ValueError(f"{self.method} ordered only {len(order)} blocks (raise max_remove); asked for {k}")
        pos = {b: i for i, b in enumerate(self.blocks)}
        cand = sorted(order[:k], key=pos.__getitem__)
        return cand if feasible is None or feasible(cand) else None

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "blocks": self.blocks, "scores": self.scores, "cost": self.cost,
                "seconds": self.seconds, "order": self.order,
                "windows": {str(k): v for k, v in self.windows.items()} if self.windows else None,
                "extra": self.extra}


# -- registry ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnalyserSpec:
    name: str
    fn: Callable[..., Importance]
    cost: str


ANALYSERS: dict[str, AnalyserSpec] = {}


def register_analyser(name: str, cost: str = "") -> Callable:
    """Decorator: ``fn(ctx: Context, **options) -> dict[str, float] | Importance`` under ``name``.
    A ``name:arg`` method string passes ``arg`` as ``options["arg"]`` (e.g. ``random:3``)."""

    def wrap(fn: Callable) -> Callable:
        if name in ANALYSERS:
            raise ValueError(f"analyser {name!r} is already registered")
        ANALYSERS[name] = AnalyserSpec(name, fn, cost)
        return fn

    return wrap


def available() -> list[str]:
    return sorted(ANALYSERS)


class Context:
    """One analysis of one task: shared passes are computed once and cached here."""

    def __init__(self, task: LayerTask, *, kind: str = "empirical", generator: torch.Generator | None = None,
                 progress: bool = False) -> None:
        if kind not in ("empirical", "true"):
            raise ValueError(f"kind must be 'empirical' or 'true', got {kind!r}")
        self.task = task
        self.model = task.model
        self.blocks: list[Block] = task.blocks
        self.names = [b.name for b in self.blocks]
        self.kind = kind
        self.generator = generator
        self.progress = progress
        self.cache: dict[str, Any] = {}

    def shared(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def target(self, output: Tensor, target: Tensor) -> Tensor:
        if self.kind == "true":
            return self.task.lik.sample(output.detach(), target, 1.0, self.generator)
        return target


def analyse(task: LayerTask, methods: Sequence[str], *, kind: str = "empirical",
            options: dict[str, dict[str, Any]] | None = None, context: Context | None = None) -> dict[str, Importance]:
    """Run the named analysers on ``task``; ``options[method]`` are keyword options of one of them."""
    unknown = [m for m in methods if m.split(":")[0] not in ANALYSERS]
    if unknown:
        raise ValueError(f"unknown importance methods {unknown}; available: {available()}")
    ctx = context or Context(task, kind=kind)
    out: dict[str, Importance] = {}
    for method in methods:
        base, _, arg = method.partition(":")
        spec = ANALYSERS[base]
        opts = dict((options or {}).get(method, (options or {}).get(base, {})))
        if arg:
            opts["arg"] = arg
        t0 = time.perf_counter()
        res = spec.fn(ctx, **opts)
        if not isinstance(res, Importance):
            res = Importance(method, list(ctx.names), {k: float(v) for k, v in res.items()})
        res.method, res.cost = method, res.cost or spec.cost
        res.seconds = time.perf_counter() - t0
        missing = set(ctx.names) - set(res.scores)
        if missing:
            raise ValueError(f"analyser {method!r} gave no score for blocks {sorted(missing)}")
        out[method] = res
    return out


# -- hooks on block inputs and outputs -----------------------------------------------------------------


@contextlib.contextmanager
def block_io(model: nn.Module, blocks: Sequence[Block], fn: Callable[[int, Tensor, Tensor], Tensor | None]):
    """Call ``fn(i, x, y)`` with block i's input and output on every call of block i; a tensor returned
    replaces the output's hidden state."""
    stacks: list[list[Tensor]] = [[] for _ in blocks]
    handles = []

    def pre(i):
        def hook(mod, args, kwargs):
            x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
            stacks[i].append(x)
        return hook

    def post(i):
        def hook(mod, args, out):
            x = stacks[i].pop()
            y = first_tensor(out)
            new = fn(i, x, y)
            if new is None:
                return None
            if isinstance(out, Tensor):
                return new
            return type(out)([new, *out[1:]])
        return hook

    try:
        for i, b in enumerate(blocks):
            handles.append(_get(model, b.members[0]).register_forward_pre_hook(pre(i), with_kwargs=True))
            handles.append(_get(model, b.members[-1]).register_forward_hook(post(i)))
        yield
    finally:
        for h in handles:
            h.remove()


def _feature_dim(t: Tensor) -> int:
    return 1 if t.dim() == 4 else -1


def _token_cos(a: Tensor, b: Tensor, mask: Tensor | None) -> tuple[float, float, int]:
    """Sum of (1 - cos) and of arccos/pi over tokens, and the token count."""
    if a.shape != b.shape:
        raise ValueError(f"hidden states of shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be compared")
    d = _feature_dim(a)
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=d, eps=1e-12).clamp(-1, 1)
    if mask is not None:
        m = mask.to(torch.bool)
        if m.shape != cos.shape:
            raise ValueError(f"token mask of shape {tuple(m.shape)} does not match hidden states {tuple(cos.shape)}")
        cos = cos[m]
    return float((1 - cos).sum()), float((torch.arccos(cos) / math.pi).sum()), cos.numel()


def _masks(task: LayerTask, batch: Any, calls: int) -> list[Tensor | None]:
    m = task.mask(batch)
    if m is None or isinstance(m, Tensor):
        return [m] * calls
    m = list(m)
    if len(m) != calls:
        raise ValueError(f"token_mask returned {len(m)} masks for {calls} passes through the blocks")
    return m


@torch.no_grad()
def _hidden_pass(ctx: Context) -> dict[str, Any]:
    """One forward pass: BI per block and the angular distance of every contiguous run of blocks."""
    task, blocks, n = ctx.task, ctx.blocks, len(ctx.blocks)
    scs = [shortcut(ctx.model, b) for b in blocks]
    one = np.zeros(n)
    ang = np.zeros((n, n + 1))  # ang[l, m]: run l..m-1
    tokens = 0
    records: list[tuple[int, Tensor, Tensor]] = []

    def fn(i, x, y):
        records.append((i, x.detach(), y.detach()))
        return None

    model = ctx.model
    was = model.training
    model.eval()
    try:
        with block_io(model, blocks, fn):
            for batch in task.calib:
                records.clear()
                inputs, _ = task.split(batch)
                model(*inputs)
                calls = [records[j:j + n] for j in range(0, len(records), n)]
                if any([r[0] for r in c] != list(range(n)) for c in calls):
                    raise ValueError("blocks were not called in their listed order (one pass through all "
                                     "blocks per call); name them in forward order with names=[...]")
                for call, mask in zip(calls, _masks(task, batch, len(calls))):
                    hs = [r[1] for r in call] + [call[-1][2]]  # inputs of every block, then the last output
                    for lo in range(n):
                        z = hs[lo]
                        for hi in range(lo + 1, n + 1):
                            z = scs[hi - 1](z)
                            bi, a, cnt = _token_cos(z, hs[hi], mask)
                            ang[lo, hi] += a
                            if hi == lo + 1:
                                one[lo] += bi
                    tokens += cnt
    finally:
        model.train(was)
    tokens = max(tokens, 1)
    return {"bi": one / tokens, "ang": ang / tokens}


@register_analyser("block_influence", "1 F (shared with angular)")
def _bi(ctx: Context, **_) -> dict[str, float]:
    h = ctx.shared("hidden", lambda: _hidden_pass(ctx))
    return dict(zip(ctx.names, h["bi"].tolist()))


@register_analyser("angular", "1 F (shared with block_influence)")
def _angular(ctx: Context, **_) -> Importance:
    h = ctx.shared("hidden", lambda: _hidden_pass(ctx))
    n = len(ctx.names)
    ang = h["ang"]
    windows = {k: sorted((float(ang[lo, lo + k]), lo) for lo in range(n - k + 1)) for k in range(1, n + 1)}
    scores = {b: float(ang[i, i + 1]) for i, b in enumerate(ctx.names)}
    return Importance("angular", list(ctx.names), scores, windows=windows)


# -- gradient passes -------------------------------------------------------------------------------


@contextlib.contextmanager
def _frozen(model: nn.Module, train_params: Sequence[nn.Parameter] = ()):
    flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    was = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for p in train_params:
            p.requires_grad_(True)
        model.eval()
        yield
    finally:
        for p, f, g in flags:
            p.requires_grad_(f)
            p.grad = g
        model.train(was)


def _gate_pass(ctx: Context) -> dict[str, np.ndarray]:
    """Per-sample derivative of the NLL with respect to a scalar gate on each block's residual branch
    (one fresh gate tensor per call, summed over calls of the same block): mean and mean square."""
    task, blocks = ctx.task, ctx.blocks
    scs = [shortcut(ctx.model, b) for b in blocks]
    n = len(blocks)
    g_sum = np.zeros(n)
    g_sq = np.zeros(n)
    count = 0
    gates: list[list[Tensor]] = [[] for _ in blocks]

    def fn(i, x, y):
        s = scs[i](x)
        g = torch.ones((y.shape[0],) + (1,) * (y.dim() - 1), dtype=y.dtype, device=y.device, requires_grad=True)
        gates[i].append(g)
        return s + g * (y - s)

    with _frozen(ctx.model), block_io(ctx.model, blocks, fn):
        for batch in task.calib:
            for lst in gates:
                lst.clear()
            inputs, target = task.split(batch)
            out = ctx.model(*inputs)
            losses, cnt = task.lik.nll(out, ctx.target(out, target))
            flat = [g for lst in gates for g in lst]
            if not flat:
                raise ValueError("no block was called in the forward pass")
            grads = torch.autograd.grad(losses.sum(), flat, allow_unused=True)
            j = 0
            for i, lst in enumerate(gates):
                per = None
                for g in lst:
                    gr = grads[j]
                    j += 1
                    gr = torch.zeros_like(g) if gr is None else gr
                    per = gr.reshape(-1).double() if per is None else per + gr.reshape(-1).double()
                if per is not None:
                    g_sum[i] += float(per.sum())
                    g_sq[i] += float((per ** 2).sum())
            count += int(cnt)
    count = max(count, 1)
    return {"mean": g_sum / count, "fisher": g_sq / count, "count": count}


@register_analyser("gate_fisher", "1 FB (shared with gate_taylor)")
def _gate_fisher(ctx: Context, **_) -> dict[str, float]:
    g = ctx.shared("gate", lambda: _gate_pass(ctx))
    return dict(zip(ctx.names, g["fisher"].tolist()))


@register_analyser("gate_taylor", "1 FB (shared with gate_fisher)")
def _gate_taylor(ctx: Context, **_) -> dict[str, float]:
    g = ctx.shared("gate", lambda: _gate_pass(ctx))
    return dict(zip(ctx.names, (-g["mean"] + 0.5 * g["fisher"]).tolist()))


def _fisher_pass(ctx: Context) -> dict[str, Any]:
    from fishertune.fisher import diagonal_fisher

    names: set[str] = set()
    for b in ctx.blocks:
        names |= {n for n, p in block_parameters(ctx.model, b).items() if p.requires_grad}
    if not names:
        raise ValueError("the blocks have no trainable parameters (fisher_* needs requires_grad=True)")
    res = diagonal_fisher(ctx.model, ctx.task.calib, likelihood=ctx.task.lik, kind=ctx.kind,
                          params=lambda n, p: n in names, batch_to_inputs=ctx.task.split,
                          generator=ctx.generator, progress=ctx.progress)
    total, size = [], []
    for b in ctx.blocks:
        ps = [n for n in block_parameters(ctx.model, b) if n in res.fisher]
        total.append(float(sum(res.fisher[n].double().sum() for n in ps)))
        size.append(sum(res.fisher[n].numel() for n in ps))
    return {"sum": np.asarray(total), "numel": np.asarray(size), "paths": res.paths}


@register_analyser("fisher_sum", "1 FB (shared with fisher_mean)")
def _fisher_sum(ctx: Context, **_) -> Importance:
    f = ctx.shared("fisher", lambda: _fisher_pass(ctx))
    return Importance("fisher_sum", list(ctx.names), dict(zip(ctx.names, f["sum"].tolist())),
                      extra={"paths": f["paths"]})


@register_analyser("fisher_mean", "1 FB (shared with fisher_sum)")
def _fisher_mean(ctx: Context, **_) -> Importance:
    f = ctx.shared("fisher", lambda: _fisher_pass(ctx))
    return Importance("fisher_mean", list(ctx.names), dict(zip(ctx.names, (f["sum"] / np.maximum(f["numel"], 1)).tolist())),
                      extra={"paths": f["paths"]})


def _grad_pass(ctx: Context) -> dict[str, np.ndarray]:
    """Mean gradient of the NLL over the calibration data, per block: its norm and ``sum theta * g``."""
    task = ctx.task
    params = [block_parameters(ctx.model, b) for b in ctx.blocks]
    flat = [p for ps in params for p in ps.values()]
    count = 0
    with _frozen(ctx.model, flat):
        for batch in task.calib:
            inputs, target = task.split(batch)
            out = ctx.model(*inputs)
            losses, cnt = task.lik.nll(out, ctx.target(out, target))
            losses.sum().backward()
            count += int(cnt)
        count = max(count, 1)
        norm, dot = [], []
        for ps in params:
            gs = [(p.detach(), p.grad if p.grad is not None else torch.zeros_like(p)) for p in ps.values()]
            norm.append(math.sqrt(sum(float((g.double() / count).pow(2).sum()) for _, g in gs)))
            dot.append(sum(float((p.double() * g.double()).sum()) for p, g in gs) / count)
    return {"norm": np.asarray(norm), "dot": np.asarray(dot)}


@register_analyser("grad_norm", "1 FB (shared with taylor)")
def _grad_norm(ctx: Context, **_) -> dict[str, float]:
    g = ctx.shared("grad", lambda: _grad_pass(ctx))
    return dict(zip(ctx.names, g["norm"].tolist()))


@register_analyser("taylor", "1 FB (shared with grad_norm)")
def _taylor(ctx: Context, **_) -> dict[str, float]:
    g = ctx.shared("grad", lambda: _grad_pass(ctx))
    return dict(zip(ctx.names, np.abs(g["dot"]).tolist()))


# -- ablation -----------------------------------------------------------------------------------------


def _score_without(ctx: Context, remove: Sequence[str]) -> float:
    with blocks_removed(ctx.model, ctx.blocks, remove):
        return ctx.task.calibration_score(ctx.model)


@register_analyser("ablation", "N + 1 F")
def _ablation(ctx: Context, **_) -> Importance:
    base = ctx.shared("base_score", lambda: ctx.task.calibration_score(ctx.model))
    scores = {b: base - _score_without(ctx, [b]) for b in ctx.names}
    return Importance("ablation", list(ctx.names), scores, extra={"base": base})


@register_analyser("greedy", "sum_{j<k} (N - j) F for k removed blocks")
def _greedy(ctx: Context, max_remove: int | None = None, **_) -> Importance:
    n = len(ctx.names)
    k = n - 1 if max_remove is None else int(max_remove)
    if not 1 <= k <= n:
        raise ValueError(f"greedy max_remove must be in [1, {n}], got {max_remove}")
    removed: list[str] = []
    trace = []
    for _ in range(k):
        best = None
        for b in ctx.names:
            if b in removed:
                continue
            s = _score_without(ctx, removed + [b])
            if best is None or s > best[0]:
                best = (s, b)
        removed.append(best[1])
        trace.append(best[0])
    # scores: removal position (earlier = less important); never-removed blocks rank above all
    scores = {b: float(removed.index(b)) if b in removed else float(n) for b in ctx.names}
    return Importance("greedy", list(ctx.names), scores, order=removed, extra={"calib_scores": trace})


# -- baselines -----------------------------------------------------------------------------------------


@register_analyser("last", "0")
def _last(ctx: Context, **_) -> dict[str, float]:
    return {b: -float(i) for i, b in enumerate(ctx.names)}


@register_analyser("random", "0")
def _random(ctx: Context, arg: str | None = None, seed: int | None = None, **_) -> dict[str, float]:
    s = int(arg) if arg is not None else int(seed or 0)
    perm = np.random.default_rng(s).permutation(len(ctx.names))
    return {b: float(perm[i]) for i, b in enumerate(ctx.names)}
