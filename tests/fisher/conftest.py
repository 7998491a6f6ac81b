"""Fisher engine tests: float64 and a fixed seed for every test (the brute-force references are in brute.py)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("FISHERTUNE_PROGRESS", "0")


@pytest.fixture(autouse=True)
def _float64_and_seed():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)
