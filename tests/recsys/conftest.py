"""Shared fixtures of the recommender-lab tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest


@pytest.fixture
def data_root() -> Callable[..., Path]:
    """``data_root("ml-1m")`` -> ``$FISHERTUNE_DATA/ml-1m``, skipping the test when it is missing.

    ``data_root()`` gives the root itself. Real data is found only through ``FISHERTUNE_DATA``; when it
    is unset or the dataset folder/file is absent the test is skipped, never failed.
    """

    def need(dataset: str = "") -> Path:
        env = os.environ.get("FISHERTUNE_DATA")
        if not env:
            pytest.skip("FISHERTUNE_DATA is not set")
        path = Path(env).expanduser() / dataset
        if not path.exists():
            pytest.skip(f"dataset {dataset or '(root)'} not found at {path}")
        return path

    return need
