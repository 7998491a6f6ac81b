"""Filtering before a split: rating threshold, minimum interactions per user / item, k-core.

All vectorised (``np.bincount`` over index arrays). After filtering, users and items left with no
interactions are dropped and both maps re-indexed (:meth:`IdMap.subset`), so indices stay contiguous.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fishertune.recsys.data.types import Interactions


class EmptyDataError(ValueError):
    """Filtering removed every interaction; the message names the settings that did it."""


def reindex(inter: Interactions) -> Interactions:
    """Drop users and items with no rows and re-index both maps (rows keep their order)."""
    keep_u = np.bincount(inter.users, minlength=inter.n_users) > 0
    keep_i = np.bincount(inter.items, minlength=inter.n_items) > 0
    if keep_u.all() and keep_i.all():
        return inter
    user_ids, remap_u = inter.user_ids.subset(keep_u)
    item_ids, remap_i = inter.item_ids.subset(keep_i)
    return Interactions(remap_u[inter.users], remap_i[inter.items], user_ids, item_ids, inter.ratings,
                        inter.timestamps, inter.name)


def filter_interactions(inter: Interactions, min_rating: float | None = None, min_user_interactions: int = 0,
                        min_item_interactions: int = 0,
                        k_core: bool = False) -> tuple[Interactions, dict[str, Any]]:
    """Keep ratings ``>= min_rating``, then items with ``>= min_item_interactions`` rows, then users with
    ``>= min_user_interactions`` (one pass, in that order, as Liang et al.'s Mult-VAE preprocessing);
    with ``k_core`` the two count filters repeat until nothing changes, so every user and item left
    meets its minimum. Returns the re-indexed result and a report of what each step removed.
    """
    report: dict[str, Any] = {"input": len(inter)}
    if min_rating is not None:
        if inter.ratings is None:
            raise ValueError(f"{inter.name or 'data'}: min_rating={min_rating} is set but the data has no "
                             "ratings (name its rating column, or unset min_rating)")
        inter = inter.take(inter.ratings >= min_rating)
        report["after_min_rating"] = len(inter)
    users, items = inter.users, inter.items
    keep = np.ones(len(users), dtype=bool)
    rounds = 0
    while min_user_interactions > 1 or min_item_interactions > 1:
        rounds += 1
        before = int(keep.sum())
        if min_item_interactions > 1:
            keep &= (np.bincount(items[keep], minlength=inter.n_items) >= min_item_interactions)[items]
        if min_user_interactions > 1:
            keep &= (np.bincount(users[keep], minlength=inter.n_users) >= min_user_interactions)[users]
        if not k_core or int(keep.sum()) == before:  # each k-core round removes rows, so it ends
            break
    if rounds:
        report["count_filter_rounds"] = rounds
        inter = inter.take(keep) if not keep.all() else inter
        report["after_count_filters"] = len(inter)
    if len(inter) == 0:
        raise EmptyDataError(
            f"{inter.name or 'data'}: no interactions left after filtering (min_rating={min_rating}, "
            f"min_user_interactions={min_user_interactions}, min_item_interactions={min_item_interactions}, "
            f"k_core={k_core}); relax the filters")
    inter = reindex(inter)
    report.update(users=inter.n_users, items=inter.n_items, interactions=len(inter))
    return inter, report
