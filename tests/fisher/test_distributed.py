"""Two gloo processes on disjoint shards equal one process on all the data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dist_helper


@pytest.mark.parametrize("mode", ["unequal", "empty"])
def test_two_gloo_processes_equal_one(tmp_path, mode):
    from fishertune.fisher import diagonal_fisher

    out = str(tmp_path / "res")
    helper = Path(__file__).with_name("dist_helper.py")
    proc = subprocess.run([sys.executable, str(helper), out, mode], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    x, y = dist_helper.data()
    with torch.random.fork_rng():
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)  # as in the helper processes
        try:
            model = dist_helper.model()
        finally:
            torch.set_default_dtype(old)
    ref = diagonal_fisher(model, [(x[i:i + 5], y[i:i + 5]) for i in range(0, 10, 5)], progress=False)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        assert got["n"] == 10 and got["batches"] == 3
        for name in ref.keys():
            torch.testing.assert_close(got["fisher"][name], ref[name])
