"""Per-user item sequences in time order, for sequential recommenders (SASRec, BERT4Rec).

A :class:`~fishertune.recsys.data.types.Split` holds sets (sparse matrices), not orders, so the order
comes from the :class:`~fishertune.recsys.data.types.Interactions` the split was made from: either
attached with :func:`attach_sequences` (in memory) or re-read from the data config that
:func:`fishertune.recsys.data.load_split` records in ``split.meta["config"]``.

Sequences are a CSR-like pair ``(indptr, items)``: user ``u``'s items, oldest first, are
``items[indptr[u]:indptr[u + 1]]`` (0-based item indices). Padded tensors use ``item + 1`` with
``0`` = padding, left-padded so that the latest item is in the last column.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from fishertune.recsys.data.types import Interactions, Split

__all__ = [
    "attach_sequences",
    "compact_by_history",
    "filter_sequences",
    "ordered_sequences",
    "pad_last",
    "split_sequences",
]

_META_KEY = "sequences"


def ordered_sequences(inter: Interactions) -> tuple[np.ndarray, np.ndarray]:
    """``(indptr, items)``: every user's items ordered by timestamp (ties, or no timestamps: row order)."""
    n = len(inter)
    key = inter.timestamps if inter.timestamps is not None else np.zeros(n, dtype=np.int64)
    order = np.lexsort((np.arange(n), key, inter.users))
    counts = np.bincount(inter.users, minlength=inter.n_users)
    indptr = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    return indptr, inter.items[order].astype(np.int64)


def _union(split: Split) -> sp.csr_matrix:
    mats = [split.train, split.valid_input, split.valid_target, split.test_input, split.test_target]
    out = sp.csr_matrix(mats[0].shape, dtype=np.float32)
    for m in mats:
        out = out + (sp.csr_matrix(m) != 0).astype(np.float32)
    out = out.tocsr()
    out.eliminate_zeros()
    return out


def _check(split: Split, indptr: np.ndarray, items: np.ndarray, source: str) -> None:
    if len(indptr) != split.n_users + 1 or (len(items) and items.max() >= split.n_items):
        raise ValueError(f"sequences from {source} are for {len(indptr) - 1} users / items up to "
                         f"{int(items.max()) if len(items) else -1}; the split has {split.n_users} users x "
                         f"{split.n_items} items")
    union = _union(split)
    users = np.repeat(np.arange(split.n_users), np.diff(indptr))
    present = np.asarray(union[users, items]).ravel() != 0 if len(items) else np.zeros(0, bool)
    if union.nnz != len(items) or not present.all():
        raise ValueError(f"sequences from {source} do not match the split: {len(items)} sequence events, "
                         f"{union.nnz} (user, item) pairs in the split, {int((~present).sum())} sequence "
                         "events missing from it (the split must come from the same interactions, without "
                         "duplicate (user, item) pairs)")


def attach_sequences(split: Split, inter: Interactions) -> Split:
    """Record ``inter``'s time order in ``split.meta`` (in memory only) and return ``split``."""
    indptr, items = ordered_sequences(inter)
    _check(split, indptr, items, f"interactions '{inter.name}'")
    split.meta[_META_KEY] = (indptr, items)
    return split


def split_sequences(split: Split) -> tuple[np.ndarray, np.ndarray]:
    """Every user's items (all stages) in time order: attached ones, else re-read from the data config."""
    seqs = split.meta.get(_META_KEY)
    if seqs is not None:
        return seqs
    config: Any = split.meta.get("config")
    if config is None:
        raise ValueError("this split carries no item order: call fishertune.recsys.sequences."
                         "attach_sequences(split, interactions) or build it with load_split(data_config)")
    from fishertune.recsys.data import DataConfig, load_interactions

    inter, _ = load_interactions(DataConfig(**config))
    if not (np.array_equal(inter.user_ids.ids, split.user_ids.ids)
            and np.array_equal(inter.item_ids.ids, split.item_ids.ids)):
        raise ValueError(f"re-reading data '{config.get('name')}' gave other user / item IDs than the split "
                         "(the data changed since the split was cached?)")
    attach_sequences(split, inter)
    return split.meta[_META_KEY]


def filter_sequences(indptr: np.ndarray, items: np.ndarray, keep: sp.spmatrix) -> tuple[np.ndarray, np.ndarray]:
    """The sub-sequences of events whose ``(user, item)`` is non-zero in ``keep`` (order kept)."""
    users = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    mask = np.asarray(sp.csr_matrix(keep)[users, items]).ravel() != 0 if len(items) else np.zeros(0, bool)
    counts = np.bincount(users[mask], minlength=len(indptr) - 1)
    return np.concatenate(([0], np.cumsum(counts))).astype(np.int64), items[mask]


def pad_last(indptr: np.ndarray, items: np.ndarray, length: int) -> np.ndarray:
    """``n_users x length`` int64: each user's last ``length`` items + 1, left-padded with 0."""
    n_users = len(indptr) - 1
    out = np.zeros((n_users, length), dtype=np.int64)
    users = np.repeat(np.arange(n_users), np.diff(indptr))
    from_end = indptr[users + 1] - 1 - np.arange(len(items))
    keep = from_end < length
    out[users[keep], length - 1 - from_end[keep]] = items[keep] + 1
    return out


def compact_by_history(seqs: Tensor, history: Tensor, length: int) -> Tensor:
    """Keep the items of padded ``seqs`` (``B x H``, item + 1, 0 = pad) that are in ``history``
    (``B x n_items`` dense rows), and left-pad the last ``length`` of them into ``B x length``."""
    safe = (seqs - 1).clamp(min=0)
    keep = (seqs > 0) & (history.gather(1, safe) > 0)
    k = keep.long()
    from_end = k.flip(1).cumsum(1).flip(1) - 1  # kept items to the right of (and at) each position, - 1
    col = torch.where(keep & (from_end < length), length - 1 - from_end, torch.full_like(from_end, length))
    out = torch.zeros(seqs.shape[0], length + 1, dtype=seqs.dtype, device=seqs.device)
    out.scatter_(1, col, seqs * keep)
    return out[:, :length]
