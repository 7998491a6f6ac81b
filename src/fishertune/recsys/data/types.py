"""The data types every part of the lab passes around.

``Interactions`` is a flat log (one row per user-item event) with contiguous indices and the maps back to
the original IDs. ``Split`` is what evaluation and training consume: sparse user x item matrices, all
with the same shape and the same ID maps, for every protocol (leave-one-out, holdout, temporal,
held-out users with fold-in). For each evaluated stage there is an *input* matrix (what the model sees
and what is masked when ranking) and a *target* matrix (what it should rank high).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True)
class IdMap:
    """Original IDs <-> contiguous indices ``0..n-1``. ``ids[i]`` is the original ID of index ``i``."""

    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_values(cls, values: np.ndarray) -> tuple["IdMap", np.ndarray]:
        """Build a map from raw ID values (sorted unique) and return it with the codes of ``values``."""
        uniques, codes = np.unique(np.asarray(values), return_inverse=True)
        return cls(uniques), codes.astype(np.int64)

    def to_index(self, original: Any) -> np.ndarray:
        """Indices of original IDs; raises ``KeyError`` naming the first unknown ID."""
        original = np.asarray(original, dtype=self.ids.dtype) if self.ids.dtype != object else np.asarray(original)
        pos = np.searchsorted(self.ids, original)
        pos = np.clip(pos, 0, len(self.ids) - 1)
        bad = self.ids[pos] != original
        if np.any(bad):
            raise KeyError(f"unknown id {np.atleast_1d(original)[np.atleast_1d(bad)][0]!r}")
        return pos.astype(np.int64)

    def to_original(self, index: Any) -> np.ndarray:
        return self.ids[np.asarray(index, dtype=np.int64)]

    def subset(self, keep: np.ndarray) -> tuple["IdMap", np.ndarray]:
        """Keep the indices where ``keep`` (bool mask) is true; return the new map and old->new (-1 dropped)."""
        keep = np.asarray(keep, dtype=bool)
        remap = np.full(len(self.ids), -1, dtype=np.int64)
        remap[keep] = np.arange(int(keep.sum()))
        return IdMap(self.ids[keep]), remap


@dataclass
class Interactions:
    """A log of user-item events with contiguous indices (``users``, ``items``) and optional columns."""

    users: np.ndarray  # int64 indices into user_ids
    items: np.ndarray  # int64 indices into item_ids
    user_ids: IdMap
    item_ids: IdMap
    ratings: np.ndarray | None = None  # float32
    timestamps: np.ndarray | None = None  # int64
    name: str = ""

    def __post_init__(self) -> None:
        n = len(self.users)
        for col in ("items", "ratings", "timestamps"):
            arr = getattr(self, col)
            if arr is not None and len(arr) != n:
                raise ValueError(f"column '{col}' has {len(arr)} rows, 'users' has {n}")

    def __len__(self) -> int:
        return len(self.users)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def take(self, rows: np.ndarray) -> "Interactions":
        """The same maps, a subset (or reordering) of rows (bool mask or indices)."""
        pick = lambda a: None if a is None else a[rows]  # noqa: E731
        return Interactions(self.users[rows], self.items[rows], self.user_ids, self.item_ids,
                            pick(self.ratings), pick(self.timestamps), self.name)

    def to_csr(self, values: str = "binary") -> sp.csr_matrix:
        """User x item matrix: ``binary`` (1 per interacted pair) or ``rating``."""
        if values == "rating" and self.ratings is not None:
            data = self.ratings.astype(np.float32)
        else:
            data = np.ones(len(self.users), dtype=np.float32)
        mat = sp.csr_matrix((data, (self.users, self.items)), shape=(self.n_users, self.n_items))
        mat.sum_duplicates()
        if values == "binary":
            mat.data[:] = 1.0
        return mat

    def stats(self) -> dict[str, float]:
        n_u = int(np.unique(self.users).size)
        n_i = int(np.unique(self.items).size)
        return {"users": n_u, "items": n_i, "interactions": len(self),
                "density": len(self) / max(1, n_u * n_i)}


@dataclass
class Split:
    """Matrices for training and evaluation, all ``n_users x n_items`` with the same ID maps.

    - ``train``: what models are fitted on.
    - ``valid_input`` / ``valid_target``: the history a model sees at validation (masked when ranking)
      and the items it should rank high. Same for ``test_*``.
    For leave-one-out, ``valid_input`` is ``train`` and ``test_input`` is ``train`` plus the validation
    item; for held-out users, the inputs are the fold-in parts of validation / test users, who have no
    row in ``train``.
    """

    train: sp.csr_matrix
    valid_input: sp.csr_matrix
    valid_target: sp.csr_matrix
    test_input: sp.csr_matrix
    test_target: sp.csr_matrix
    user_ids: IdMap
    item_ids: IdMap
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def stage(self, name: str) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        """``(input, target)`` for ``"valid"`` or ``"test"``."""
        if name not in ("valid", "test"):
            raise ValueError(f"unknown stage {name!r}; use 'valid' or 'test'")
        return getattr(self, f"{name}_input"), getattr(self, f"{name}_target")

    def eval_users(self, name: str) -> np.ndarray:
        """Users with at least one target item in the stage."""
        _, target = self.stage(name)
        return np.flatnonzero(np.diff(target.indptr) > 0)
