"""flush_denormals: denormals read as zero inside the block on the CPU, torch's default after it."""

from __future__ import annotations

import pytest
import torch

from fishertune.utils.numerics import flush_denormals

TINY = 1e-40  # denormal in float32 (the smallest normal is ~1.2e-38)


def _product() -> float:
    return float(torch.tensor([TINY], dtype=torch.float32) * 1.0)


def test_flushes_inside_and_restores_after():
    if not torch.set_flush_denormal(False):  # no hardware support (not x86 with SSE3): nothing to check
        pytest.skip("this CPU cannot flush denormals")
    assert _product() > 0
    with flush_denormals("cpu"):
        assert _product() == 0.0
    assert _product() > 0
    with pytest.raises(RuntimeError), flush_denormals(torch.device("cpu")):
        raise RuntimeError("an error inside the block")
    assert _product() > 0  # restored on the way out of an error too


def test_other_devices_are_left_alone():
    with flush_denormals("meta"):
        assert _product() > 0
