"""Shared pieces of the views: the Agg backend, atomic PNG writes, user / item ID look-ups, titles."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from fishertune.recsys.data.types import IdMap, Split

__all__ = ["new_figure", "save_png", "lookup_id", "item_labels", "item_titles", "py", "stage_rows"]


def new_figure(width: float, height: float) -> Any:
    """A matplotlib ``Figure`` on the Agg backend (no display needed, thread-safe: no pyplot state)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def save_png(fig: Any, path: str | os.PathLike, dpi: int = 90) -> Path:
    """Write ``fig`` to ``path`` as PNG, atomically."""
    from fishertune.utils.io import atomic_write

    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=dpi, bbox_inches="tight"))


def lookup_id(ids: IdMap, original: str | int, what: str) -> int:
    """The index of an original user / item ID given on the command line (as text or a number).

    Raises ``ValueError`` naming the ID and a few valid ones when it is not in the run's data."""
    dtype = ids.ids.dtype
    try:
        value: Any = original if dtype == object else np.asarray(str(original)).astype(dtype)
    except ValueError:
        value = None
    if value is not None:
        try:
            return int(ids.to_index([value])[0])
        except KeyError:
            pass
    examples = ", ".join(str(x) for x in ids.ids[:5])
    raise ValueError(f"unknown {what} id {original!r}: not in this run's data ({len(ids):,} {what}s, "
                   f"e.g. {examples})")


def item_titles(data_name: str) -> dict[Any, str]:
    """Item titles of a MovieLens dataset by original item ID (``movies.dat`` / ``u.item``, read from
    ``FISHERTUNE_DATA``); an empty dict for other datasets or when the file is missing."""
    from fishertune.utils.settings import data_root

    files = {"ml-1m": ("movies.dat", "::"), "ml-100k": ("u.item", "|")}
    if data_name not in files:
        return {}
    name, sep = files[data_name]
    path = data_root() / data_name / name
    if not path.is_file():
        return {}
    titles: dict[Any, str] = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        parts = line.split(sep)
        if len(parts) >= 2 and parts[0].strip().isdigit():
            titles[int(parts[0])] = parts[1]
    return titles


def py(value: Any) -> Any:
    """A NumPy scalar as the Python value (IDs print and serialise plainly)."""
    return value.item() if isinstance(value, np.generic) else value


def item_labels(split: Split, items: np.ndarray, titles: dict[Any, str] | None = None,
                width: int = 28) -> list[str]:
    """Display labels of item indices: ``original ID`` or ``ID title`` (cut to ``width`` characters)."""
    out = []
    for orig in split.item_ids.to_original(np.asarray(items, dtype=np.int64)):
        key = py(orig)
        title = (titles or {}).get(key)
        label = f"{key} {title}" if title else str(key)
        out.append(label if len(label) <= width else label[:width - 1] + "…")
    return out


def stage_rows(split: Split, stage: str) -> Any:
    """The user-item rows a stage scores from: the training rows, or a stage's input rows."""
    if stage == "train":
        return split.train
    return split.stage(stage)[0]
