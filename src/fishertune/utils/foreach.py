"""Element-wise ops over lists of tensors, written where each device is fastest."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def foreach_into(op: str, a: Sequence[Tensor], b: Sequence[Tensor],
                 out: Sequence[Tensor] | None = None) -> list[Tensor]:
    """``torch.<op>(a[i], b[i])`` for every ``i`` (``op``: ``"sub"``, ``"mul"``, ...).

    ``out=None``: one fused ``torch._foreach_<op>`` into fresh tensors (the GPU way: multi-tensor kernels,
    and the caching allocator makes the fresh tensors free). ``out`` given: one ``torch.<op>(..., out=)``
    per tensor into those buffers (the CPU way: CPU foreach ops loop over the tensors in C++ anyway, and
    fresh parameter-sized tensors every step cost page faults). Returns the results."""
    if out is None:
        return list(getattr(torch, f"_foreach_{op}")(list(a), list(b)))
    fn = getattr(torch, op)
    for x, y, o in zip(a, b, out):
        fn(x, y, out=o)
    return list(out)


def to_floats(values: Sequence[Tensor]) -> list[float]:
    """Python floats of one-element tensors, read back in one copy instead of one per tensor: each
    ``float(t)`` of a CUDA tensor makes the host wait for the device."""
    if not values:
        return []
    device = values[0].device
    return torch.stack([v.reshape(()).to(device, torch.float64) for v in values]).tolist()
