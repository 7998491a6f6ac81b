"""Element-wise parameter masks that keep frozen entries bit-exact under any optimizer.

Zeroing the gradient of a frozen entry is not enough to keep it still: Adam keeps moving it with
momentum built up earlier, L2 weight decay adds ``wd * theta`` to its gradient and AdamW shrinks it
directly. :class:`ParameterMask` therefore does two cheap things around ``optimizer.step()``:

1. :meth:`~ParameterMask.apply_to_grads` (after ``backward``): zero the gradients of frozen entries; a
   parameter frozen as a whole gets ``grad = None``, so PyTorch optimizers skip it entirely (no update,
   no state change, no copy needed);
2. :meth:`~ParameterMask.snapshot` (before ``step``) keeps the frozen entries of partially frozen
   parameters and :meth:`~ParameterMask.restore` (after ``step``) writes them back, so whatever the
   optimizer did to them is undone bit for bit.

Both work on the parameters' bit patterns (the float tensor viewed as integers, multiplied by a
precomputed 0/1 word per entry, and frozen bits added back into zeroed entries): exact for every value
including -0.0, inf and NaN. Each pass is one ``torch._foreach_*`` call over all masked parameters: on
the GPU a few fused launches per step instead of several per parameter (the cross-domain model on an
H200: optimizer step 1.31 ms, 1.48 ms with masks and hooks; docs/cdr.md); on one CPU thread the passes
are memory-bound (there: 39 ms, 58 ms with masks, the embedding tables being 13 M entries).
Fully trainable parameters cost nothing. Optimizer state of frozen entries keeps evolving with zero
gradients (Adam's moments decay), which keeps it consistent for when the entries are unfrozen again.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from fishertune.utils.foreach import foreach_into, to_floats

__all__ = ["ParameterMask"]


class ParameterMask:
    """Boolean masks (True = trainable) over named parameters; frozen entries stay bit-exact.

    Only parameters with ``requires_grad=True`` are in scope. ``masks`` maps parameter names to boolean
    tensors of the parameter's shape; names left out are fully trainable. ``None`` makes everything
    trainable. Use per optimizer step::

        loss.backward(); mask.apply_to_grads(); mask.snapshot(); opt.step(); mask.restore()
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, Tensor] | None = None):
        self.model = model
        self.params: dict[str, nn.Parameter] = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError(f"{type(model).__name__} has no trainable parameters (requires_grad=True)")
        # name -> bool mask (True = trainable), only for parameters with at least one frozen entry
        self._masks: dict[str, Tensor] = {}
        self._keep: dict[str, Tensor] = {}      # integer words: 1 where trainable, 0 where frozen
        self._frozen: dict[str, Tensor] = {}    # the complement
        self._buf: dict[str, Tensor] = {}       # snapshot (frozen bits of the values), see set()
        self._full_frozen: set[str] = set()
        self._active: dict[str, int] = {}
        self._saved_full: dict[str, Tensor] = {}
        self._has_snapshot = False
        self.set(masks or {})

    # ------------------------------------------------------------------ masks
    def set(self, masks: Mapping[str, Tensor]) -> None:
        """Replace all masks; parameters not named become fully trainable."""
        unknown = [n for n in masks if n not in self.params]
        if unknown:
            raise ValueError(f"masks name parameters that are not trainable parameters of the model: {unknown[:8]}"
                             f"; names are e.g. {list(self.params)[:8]}")
        new_masks: dict[str, Tensor] = {}
        keep: dict[str, Tensor] = {}
        frozen: dict[str, Tensor] = {}
        full: set[str] = set()
        active = {name: p.numel() for name, p in self.params.items()}
        given = {name: _as_bool(name, masks[name], p) for name, p in self.params.items() if name in masks}
        counts = to_floats([m.sum() for m in given.values()])  # one wait for the device, not one per mask
        for (name, m), count in zip(given.items(), counts):
            p = self.params[name]
            n_active = active[name] = int(count)
            if n_active == p.numel():
                continue
            new_masks[name] = m
            if n_active == 0:
                full.add(name)
            else:
                itype = _int_dtype(p)
                keep[name] = m.to(itype)
                frozen[name] = (~m).to(itype)
        self._masks, self._keep, self._frozen, self._full_frozen = new_masks, keep, frozen, full
        self._active = active
        # snapshot buffers: kept on the CPU (fresh tensors there cost page faults), fresh each step on the GPU
        self._buf = {n: torch.empty_like(f) for n, f in frozen.items() if f.device.type == "cpu"}
        self._saved_full = {}
        self._has_snapshot = False

    def mask(self, name: str) -> Tensor:
        """The boolean mask of one parameter (all True when it is fully trainable)."""
        if name not in self.params:
            raise KeyError(f"{name!r} is not a trainable parameter of the model")
        m = self._masks.get(name)
        return m if m is not None else torch.ones_like(self.params[name], dtype=torch.bool)

    def masks(self) -> dict[str, Tensor]:
        """Masks of every parameter in scope (fully trainable ones all True)."""
        return {n: self.mask(n) for n in self.params}

    # ------------------------------------------------------------------ step protocol
    def apply_to_grads(self) -> None:
        """Zero the gradients of frozen entries (call after ``backward``, before ``step``)."""
        for name in self._full_frozen:
            self.params[name].grad = None
        bits, words = [], []
        for name, keep in self._keep.items():
            p = self.params[name]
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                g = p.grad.coalesce()
                rows = g.indices()[0]
                kept = self._masks[name][rows].to(g.dtype)
                p.grad = torch.sparse_coo_tensor(g.indices(), g.values() * kept, g.shape,
                                                 check_invariants=False).coalesce()
            else:
                bits.append(p.grad.view(keep.dtype))
                words.append(keep)
        if bits:
            torch._foreach_mul_(bits, words)

    def snapshot(self) -> None:
        """Remember the frozen values (call just before ``optimizer.step()``)."""
        names = list(self._frozen)
        if names:
            bits = [self.params[n].detach().view(self._frozen[n].dtype) for n in names]
            words = [self._frozen[n] for n in names]
            out = [self._buf[n] for n in names] if bits[0].device.type == "cpu" else None  # see set()
            self._buf.update(zip(names, foreach_into("mul", bits, words, out)))
        self._saved_full = {}
        for name in self._full_frozen:
            p = self.params[name]
            if p.grad is not None:        # apply_to_grads not called: the optimizer would touch it
                self._saved_full[name] = p.detach().clone()
        self._has_snapshot = True

    def restore(self) -> None:
        """Write the remembered values back into the frozen entries (call after ``optimizer.step()``)."""
        if not self._has_snapshot:
            return
        with torch.no_grad():
            if self._keep:
                bits = [self.params[n].detach().view(k.dtype) for n, k in self._keep.items()]
                torch._foreach_mul_(bits, list(self._keep.values()))      # frozen entries -> 0
                torch._foreach_add_(bits, [self._buf[n] for n in self._keep])  # + their saved bits
            for name, val in self._saved_full.items():
                self.params[name].copy_(val)
        self._saved_full = {}
        self._has_snapshot = False

    # ------------------------------------------------------------------ counts
    def active_count(self) -> dict[str, int]:
        """Trainable entries per parameter."""
        return dict(self._active)

    def total_count(self) -> dict[str, int]:
        """Entries per parameter."""
        return {n: p.numel() for n, p in self.params.items()}

    def ratio(self) -> float:
        """Fraction of trainable entries over all parameters in scope."""
        total = sum(p.numel() for p in self.params.values())
        return sum(self._active.values()) / total if total else 0.0

    def active_tensors(self) -> int:
        """Number of parameter tensors with at least one trainable entry."""
        return sum(1 for v in self._active.values() if v > 0)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The masks that freeze something (CPU bool tensors)."""
        return {"masks": {n: m.detach().cpu().clone() for n, m in self._masks.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "masks" not in state:
            raise ValueError("ParameterMask state has no 'masks' entry")
        self.set(state["masks"])


def _int_dtype(p: Tensor) -> torch.dtype:
    kinds = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    if not p.is_floating_point() or p.element_size() not in kinds:
        raise ValueError(f"ParameterMask supports floating-point parameters of 2, 4 or 8 bytes, got {p.dtype}")
    return kinds[p.element_size()]


def _as_bool(name: str, mask: Tensor, p: Tensor) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask of {name!r} must be a tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(p.shape):
        raise ValueError(f"mask of {name!r} has shape {tuple(mask.shape)}, the parameter {tuple(p.shape)}")
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"mask of {name!r} must be boolean (or 0/1), got other values")
        mask = mask != 0
    return mask.detach().to(p.device)
