"""Fixtures of the cross-domain tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from cdr_helpers import write_pair


@pytest.fixture
def cdr_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data root holding an intra pair ``aa_bb`` and an inter pair ``aa_bb``; the cache in tmp."""
    root = tmp_path / "data"
    write_pair(root, "dual-user-intra")
    write_pair(root, "dual-user-inter", n_users=40, seed=1)
    monkeypatch.setenv("FISHERTUNE_DATA", str(root))
    monkeypatch.setenv("FISHERTUNE_CACHE", str(tmp_path / "cache"))
    return root

