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
    """Python floats of one-element tensors, with one device-to-host copy per device instead of one per
    tensor: each ``float(t)`` of a CUDA tensor makes the host wait for the device."""
    out: list[float] = [0.0] * len(values)
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        by_device.setdefault(v.device, []).append(i)
    for idx in by_device.values():
        got = torch.stack([values[i].reshape(()).double() for i in idx]).tolist()
        for i, x in zip(idx, got):
            out[i] = x
    return out
