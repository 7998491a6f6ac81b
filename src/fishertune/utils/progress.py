"""Rich progress bars with ETA for every loop over data."""

from __future__ import annotations

import os
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

T = TypeVar("T")

console = Console(stderr=True)


def progress_enabled() -> bool:
    """Bars are off when ``FISHERTUNE_PROGRESS=0`` (tests, logs) or stderr is not a terminal."""
    flag = os.environ.get("FISHERTUNE_PROGRESS")
    if flag is not None:
        return flag not in ("0", "false", "no", "")
    return console.is_terminal


def track(iterable: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar showing count, elapsed time and ETA."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if not progress_enabled():
        yield from iterable
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in iterable:
            yield item
            bar.advance(task)
