"""The hook machinery: forward hooks save each handled module's inputs, tensor hooks on its outputs
receive the output gradients during backward, and the handler's rule turns both into squared
per-sample gradients, added to the batch's contributions.

Cost control: while the engine runs, the model's parameters are frozen (``requires_grad=False``), so
autograd computes only the activation gradients, never the summed weight gradients that the Fisher
does not need; the outputs of handled modules are made differentiable (a cheap copy) when nothing
upstream requires grad. Requires-grad flags are restored afterwards.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from fishertune.fisher.functorch import module_per_sample, output_dims
from fishertune.fisher.hooks import (TOTAL, Ctx, LinearRule, RuleError, SparseRows, SparseSamples,
                                     chunked_square_sum, finish_sparse_samples)
from fishertune.fisher.plan import Handler, Plan


_LINEAR = LinearRule()


class _Anchor(torch.autograd.Function):
    """Identity (a copy) whose output requires grad, so that backward reaches a module's output."""

    @staticmethod
    def forward(ctx, x: Tensor, dummy: Tensor) -> Tensor:  # noqa: ARG004
        return x.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, None


@dataclass
class _Record:
    handler: Handler
    saved: Any
    versions: list[tuple[Tensor, int]]
    out_dims: list[int | None]
    n_out: int
    autocast: tuple[str, torch.dtype] | None
    grads: dict[int, Tensor] = field(default_factory=dict)


def _versions(obj: Any) -> list[tuple[Tensor, int]]:
    return [(t, t._version) for t in tree_flatten(obj)[0] if isinstance(t, Tensor)]


class HookManager:
    """Installs hooks for a plan and collects one batch's contributions (dense or sparse rows)."""

    def __init__(self, plan: Plan, param_dtypes: dict[str, torch.dtype], chunk_elems: int = 1 << 24):
        self.plan = plan
        self.chunk_elems = chunk_elems
        self.acc_dtype = {n: (torch.float64 if d == torch.float64 else torch.float32) for n, d in param_dtypes.items()}
        self.handles: list[Any] = []
        self.active = False
        self.suspended = False
        self.batch_size = 0
        self.token_level = False
        self.scale = 1.0
        self.records: list[_Record] = []
        self.dense: dict[str, Tensor] = {}
        self.sparse: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self.totals: list[Tensor] = []
        self.unchecked: list[Tensor] = []
        self._dummy: Tensor | None = None
        self._patched_modules: list[nn.Module] = []
        self._ctxs: dict[int, Ctx] = {}
        self._called: set[int] = set()

    # -- installation ------------------------------------------------------------------------------
    def install(self) -> None:
        for h in self.plan.handlers:
            if h.rule is not None and h.rule.patches_forward:
                h.module.forward = functools.partial(self._patched, h)  # instance attribute, removed below
                self._patched_modules.append(h.module)
            else:
                self.handles.append(h.module.register_forward_hook(functools.partial(self._forward, h),
                                                                   with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for module in self._patched_modules:
            module.__dict__.pop("forward", None)
        self._patched_modules.clear()
        self.records.clear()

    # -- rules that compute through their own forward (nn.MultiheadAttention) ---------------------
    def _patched(self, h: Handler, *args: Any, **kwargs: Any) -> Any:
        if not self.active or self.suspended or not torch.is_grad_enabled():
            return type(h.module).forward(h.module, *args, **kwargs)
        try:
            return h.rule.forward(h.module, functools.partial(self._tap, h), *args, **kwargs)
        except RuleError as exc:
            raise RuleError(f"module {h.module_name!r} ({type(h.module).__name__}): {exc}") from None

    def _tap(self, h: Handler, w_name: str, w_rows: slice | None, b_name: str | None, b_rows: slice | None,
             x: Tensor, y: Tensor) -> Tensor:
        wanted = {k: r for k, r in ((w_name, w_rows), (b_name, b_rows)) if k is not None and k in h.names}
        if not wanted:
            return y
        if not y.requires_grad:
            y = self._anchor(y)
        x = x.detach()
        version = x._version

        def hook(go: Tensor) -> None:
            if self.suspended:
                return
            if x._version != version:
                raise RuleError(f"module {h.module_name!r}: an attention input was modified in place")
            names = {"weight"} if w_name in wanted else set()
            if b_name in wanted:
                names.add("bias")
            try:
                parts = _LINEAR.squares(None, x, go.detach(), names, self._ctx(h))
            except RuleError as exc:
                raise RuleError(f"module {h.module_name!r} ({type(h.module).__name__}): {exc}") from None
            total = parts.pop(TOTAL, None)
            if total is not None:
                self.totals.append(total)
            for part, key in (("weight", w_name), ("bias", b_name)):
                if part in parts:
                    self._add(h.names[key], parts[part], wanted[key], h.module.get_parameter(key).shape,
                              checked=total is not None)

        y.register_hook(hook)
        return y

    def _anchor(self, t: Tensor) -> Tensor:
        if self._dummy is None or self._dummy.device != t.device:
            self._dummy = torch.zeros((), device=t.device, requires_grad=True)
        return _Anchor.apply(t, self._dummy)

    def _ctx(self, h: Handler) -> Ctx:
        ctx = self._ctxs.get(id(h))
        if ctx is None:
            first = next(iter(h.names.values()))
            ctx = self._ctxs[id(h)] = Ctx(self.batch_size, self.token_level, self.acc_dtype[first], self.chunk_elems)
        return ctx

    # -- forward -----------------------------------------------------------------------------------
    def _forward(self, h: Handler, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        if not self.active or self.suspended or not torch.is_grad_enabled():
            return None
        if not h.multi_call:
            if id(h) in self._called:
                raise RuleError(f"module {h.module_name!r} ran more than once in this forward but once in the "
                                "traced first batch; its per-sample gradients would miss cross terms")
            self._called.add(id(h))
        if h.rule is not None:
            try:
                saved = h.rule.save(module, args, kwargs)
            except RuleError as exc:
                raise RuleError(f"module {h.module_name!r} ({type(module).__name__}): {exc}") from None
            if isinstance(output, Tensor) and output.is_floating_point():  # the common case, no pytree
                out = output if output.requires_grad else self._anchor(output)
                amp = None
                if torch.is_autocast_enabled(out.device.type):
                    amp = (out.device.type, torch.get_autocast_dtype(out.device.type))
                rec = _Record(h, saved, [(saved, saved._version)], [0], 1, amp)
                self.records.append(rec)
                out.register_hook(functools.partial(self._backward, rec, 0))
                return None if out is output else out
        else:
            saved = (args, kwargs)
        leaves, spec = tree_flatten(output)
        slots = [i for i, t in enumerate(leaves) if isinstance(t, Tensor) and t.is_floating_point()]
        if h.rule is not None and len(slots) != 1:
            raise RuleError(f"module {h.module_name!r}: expected one tensor output, got {len(slots)}")
        changed = False
        for i in slots:
            if not leaves[i].requires_grad:
                leaves[i] = self._anchor(leaves[i])
                changed = True
        amp = None
        dev = leaves[slots[0]].device.type if slots else "cpu"
        if torch.is_autocast_enabled(dev):
            amp = (dev, torch.get_autocast_dtype(dev))
        dims = output_dims(module, output, self.batch_size) if h.rule is None else [0]
        rec = _Record(h, saved, _versions(saved), dims, len(slots), amp)
        self.records.append(rec)
        for k, i in enumerate(slots):
            leaves[i].register_hook(functools.partial(self._backward, rec, k))
        return tree_unflatten(leaves, spec) if changed else None

    # -- backward ----------------------------------------------------------------------------------
    def _backward(self, rec: _Record, slot: int, grad: Tensor) -> None:
        if self.suspended:
            return
        rec.grads[slot] = grad.detach()
        if rec.handler.rule is not None and not rec.handler.multi_call:
            self._check_versions(rec)
            ctx = self._ctx(rec.handler)
            h = rec.handler
            try:
                contribs = h.rule.squares(h.module, rec.saved, rec.grads.pop(slot), set(h.names), ctx)
            except RuleError as exc:
                raise RuleError(f"module {h.module_name!r} ({type(h.module).__name__}): {exc}") from None
            total = contribs.pop(TOTAL, None)
            for local, c in contribs.items():
                self._add(h.names[local], c, checked=total is not None)
            if total is not None:
                self.totals.append(total)

    def _check_versions(self, rec: _Record) -> None:
        for t, v in rec.versions:
            if t._version != v:
                raise RuleError(f"module {rec.handler.module_name!r}: its input was modified in place after "
                                "the call; per-sample gradients would use the wrong values")

    def set_batch(self, batch_size: int, token_level: bool) -> None:
        self.batch_size = batch_size
        self.token_level = token_level
        self._ctxs.clear()

    def end_pass(self) -> None:
        """After one backward pass: compute the deferred handlers (torch.func, multi-call)."""
        per_sample: dict[str, list[Any]] = {}
        for rec in self.records:
            if not rec.grads:
                continue
            h = rec.handler
            self._check_versions(rec)
            ctx = self._ctx(h)
            try:
                if h.rule is not None:  # multi-call rule: per-sample, summed over calls below
                    parts = h.rule.per_sample(h.module, rec.saved, rec.grads[0], set(h.names), ctx)
                else:
                    grads = [rec.grads.get(k) for k in range(rec.n_out)]
                    args, kwargs = rec.saved
                    self.suspended = True
                    try:
                        parts = module_per_sample(h.module, list(h.names), args, kwargs, grads, rec.out_dims,
                                                  ctx, square=not h.multi_call, autocast=rec.autocast)
                    finally:
                        self.suspended = False
            except RuleError as exc:
                raise RuleError(f"module {h.module_name!r} ({type(h.module).__name__}): {exc}") from None
            rec.grads.clear()
            for local, c in parts.items():
                name = h.names[local]
                if h.multi_call:
                    per_sample.setdefault(name, []).append(c)
                else:
                    self._add(name, c)
        for name, parts in per_sample.items():
            if isinstance(parts[0], SparseSamples):
                self._add(name, finish_sparse_samples(parts))
            else:
                total = parts[0]
                for p in parts[1:]:
                    total = total + p
                ctx = Ctx(self.batch_size, self.token_level, self.acc_dtype[name], self.chunk_elems)
                self._add(name, chunked_square_sum(lambda s, e: total[s:e], total.shape[0],
                                                   total[0].numel(), ctx))

    def end_batch(self) -> None:
        self.records.clear()
        self._called.clear()

    # -- contributions -----------------------------------------------------------------------------
    def _add(self, name: str, c: Tensor | SparseRows, rows: slice | None = None,
             shape: torch.Size | None = None, checked: bool = False) -> None:
        """Add a contribution (times the pass's scale); unless ``checked`` (its rule reported a total),
        its sum goes to ``totals`` so that one reduction per batch detects NaN/inf."""
        s = self.scale
        if not checked:
            self.unchecked.append(c.values if isinstance(c, SparseRows) else c)
        if rows is not None:  # a block of rows of a larger parameter (fused attention projections)
            if name not in self.dense:
                self.dense[name] = torch.zeros(shape, dtype=c.dtype, device=c.device)
            self.dense[name][rows].add_(c, alpha=s)
            return
        if isinstance(c, SparseRows):
            self.sparse.setdefault(name, []).append((c.index, c.values if s == 1.0 else c.values * s))
        elif name in self.dense:
            self.dense[name].add_(c, alpha=s)
        else:
            self.dense[name] = c if s == 1.0 else c * s

    def take(self, sync: bool = False) -> tuple[dict[str, Tensor], dict[str, list[tuple[Tensor, Tensor]]], Any]:
        """The batch's contributions and whether all of them are finite (one reduction): a bool with
        ``sync``, else a 0-dim bool tensor on the device (read later, without stalling the device)."""
        dense, sparse, totals, unchecked = self.dense, self.sparse, self.totals, self.unchecked
        self.dense, self.sparse, self.totals, self.unchecked = {}, {}, [], []
        if unchecked:  # contributions are >= 0: NaN/inf shows in their 1-norms (one fused kernel)
            totals = totals + list(torch._foreach_norm(unchecked, 1))
        if not totals:
            return dense, sparse, True
        dev, dt = totals[0].device, totals[0].dtype
        same = all(t.dtype == dt and t.device == dev for t in totals)
        flag = torch.isfinite(torch.stack(totals if same else [t.to(dev, torch.float64) for t in totals]).sum())
        return dense, sparse, bool(flag) if sync else flag
