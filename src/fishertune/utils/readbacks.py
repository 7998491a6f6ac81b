"""Where code reads tensors back into Python: on CUDA each such read makes the host wait for the device."""

from __future__ import annotations

import os
import sys
from collections import Counter

from torch.overrides import TorchFunctionMode

import fishertune

__all__ = ["ReadBacks"]

_PACKAGE = os.path.dirname(os.path.abspath(fishertune.__file__))
_NAMES = frozenset({"__bool__", "__float__", "__int__", "item", "tolist"})


class ReadBacks(TorchFunctionMode):
    """Inside ``with ReadBacks() as r:``, counts the tensor-to-Python reads (``bool``, ``float``, ``int``,
    ``item``, ``tolist``) by the innermost line of the fishertune package that made them:
    ``r.lines["fishertune/tune/drfim.py:164"]``. Works on any device, so a CPU run says where a CUDA run
    would wait (reads of CPU-only tensors are counted too)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _NAMES:
            frame = sys._getframe(1)
            while frame is not None and not frame.f_code.co_filename.startswith(_PACKAGE):
                frame = frame.f_back
            if frame is not None:
                path = os.path.relpath(frame.f_code.co_filename, os.path.dirname(_PACKAGE)).replace(os.sep, "/")
                self.lines[f"{path}:{frame.f_lineno}"] += 1
        return func(*args, **(kwargs or {}))
