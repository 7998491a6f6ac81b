"""Floating-point settings that change speed, not results."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["flush_denormals"]


@contextmanager
def flush_denormals(device: torch.device | str = "cpu") -> Iterator[None]:
    """On the CPU, treat denormal floats as zero inside the block (then back to torch's default, off).

    Embedding rows that weight decay shrinks for epochs without a gradient end up denormal, and CPU
    arithmetic on denormals is many times slower: a sport_cloth validation pass took 61 s instead of
    5 s after 30 epochs (docs/cdr.md). Values below ~1e-38 do not move a ranking. No-op on other devices.
    """
    if torch.device(device).type != "cpu" or not torch.set_flush_denormal(True):
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
