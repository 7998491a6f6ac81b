"""What a results row says about its run, read without torch (the report imports it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["holdout"]


def holdout(row: Mapping[str, Any]) -> bool:
    """Whether a row's run held validation items out: false only for a refit (``data.holdout=false``);
    every row from before that option existed did."""
    config = row.get("config")
    data = config.get("data") if isinstance(config, Mapping) else None
    return not isinstance(data, Mapping) or data.get("holdout", True) is not False
