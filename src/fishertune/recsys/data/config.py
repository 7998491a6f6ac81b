"""Data and split settings, validated strictly (an unknown key is an error that names it).

Every field has an explicit default, so a resolved config records the whole recipe that produced a
split; the cache key hashes all of it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fishertune.config import StrictModel


class ColumnsConfig(StrictModel):
    """Column names in a generic CSV / TSV / Parquet file (ignored by the built-in datasets).

    ``rating`` / ``timestamp`` may be absent from the file when left at their default names; a name you
    set must exist; ``null`` skips the column."""

    user: str = "user"
    item: str = "item"
    rating: str | None = "rating"
    timestamp: str | None = "timestamp"


class SplitConfig(StrictModel):
    """Which evaluation protocol and its settings (see ``fishertune.recsys.data.splits``)."""

    protocol: Literal["leave_one_out", "holdout", "temporal", "held_out_users"] = "leave_one_out"
    valid_ratio: float = Field(0.1, ge=0, lt=1, description="holdout / temporal: validation fraction")
    test_ratio: float = Field(0.2, ge=0, lt=1, description="holdout / temporal: test fraction")
    temporal_mode: Literal["global", "user"] = Field(
        "global", description="temporal: one global time cut, or each user's latest fraction")
    n_valid_users: int = Field(100, ge=1, description="held_out_users: number of validation users")
    n_test_users: int = Field(100, ge=1, description="held_out_users: number of test users")
    target_fraction: float = Field(0.2, gt=0, lt=1, description="held_out_users: share of a held-out "
                                   "user's events to predict (the rest is folded in)")
    seed: int = Field(0, description="seed of the random parts (holdout, held_out_users)")

    @model_validator(mode="after")
    def _ratios(self) -> "SplitConfig":
        if self.valid_ratio + self.test_ratio >= 1:
            raise ValueError(f"valid_ratio + test_ratio = {self.valid_ratio + self.test_ratio} must be < 1")
        return self


class DataConfig(StrictModel):
    """A dataset, its preprocessing and its split.

    ``name`` is a registered dataset (``ml-100k``, ``ml-1m``, ``beauty``, ``sports``, ``lastfm``,
    ``cdr/dual-user-intra/sport_cloth`` ...) resolved under ``FISHERTUNE_DATA``; with ``path`` set,
    ``name`` is only a label and ``path`` a generic file (csv / tsv / parquet, see ``columns``).
    """

    name: str = "ml-100k"
    path: str | None = Field(None, description="explicit data file; overrides the registry")
    format: Literal["auto", "csv", "tsv", "parquet", "sequence"] = Field(
        "auto", description="format of `path`: by extension when auto")
    sep: str | None = Field(None, description="separator of a csv/tsv `path` (default by format)")
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig)
    duplicates: Literal["keep_last", "keep_first", "error"] = Field(
        "keep_last", description="repeated (user, item) rows: keep the latest / earliest, or fail")
    min_rating: float | None = Field(None, description="keep events with rating >= this (none: keep all)")
    min_user_interactions: int = Field(0, ge=0, description="drop users with fewer events")
    min_item_interactions: int = Field(0, ge=0, description="drop items with fewer events")
    k_core: bool = Field(False, description="repeat the two count filters until stable")
    split: SplitConfig = Field(default_factory=SplitConfig)
