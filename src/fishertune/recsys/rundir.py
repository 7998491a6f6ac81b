"""A run directory: everything one training run leaves behind, each file written atomically.

``config.yaml`` (resolved config), ``history.jsonl`` (one JSON object per epoch), ``train.log``,
``checkpoint.pt``, ``curves.png`` (training terms and the validation metric per epoch) and, from the
caller, ``metrics.json``. Only the main process writes (``RunDir(path, enabled=False)`` is a no-op
writer for the other ranks of a distributed run); every process may read.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import yaml

from fishertune.recsys.checkpoint import load_checkpoint, save_checkpoint
from fishertune.utils.io import atomic_write, atomic_write_json, atomic_write_text

__all__ = ["RunDir", "new_run_dir", "plot_history"]

logger = logging.getLogger("fishertune.recsys.train")


def new_run_dir(root: str | Path, name: str) -> Path:
    """A fresh directory ``root/<YYYYmmdd-HHMMSS>-<name>`` (``-2``, ``-3``... if taken), created."""
    root = Path(root)
    safe = "".join(c if c.isalnum() or c in "-_.=," else "-" for c in name).strip("-") or "run"
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{safe}"
    root.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        path = root / (stem if i == 1 else f"{stem}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot find a free run directory name for {stem!r} under {root}")


class RunDir:
    """Reads and (when ``enabled``) writes the files of one run."""

    CHECKPOINT = "checkpoint.pt"

    def __init__(self, path: str | Path | None, enabled: bool = True, echo: bool = True) -> None:
        self.path = Path(path) if path is not None else None
        self.enabled = enabled and self.path is not None
        self.echo = echo
        self._log_lines: list[str] = []
        self._last_plot = -math.inf
        if self.enabled:
            self.path.mkdir(parents=True, exist_ok=True)
            log = self.path / "train.log"
            if log.is_file():
                self._log_lines = log.read_text(encoding="utf-8").splitlines()

    # -- paths -------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.path is None else self.path / self.CHECKPOINT

    def has_checkpoint(self) -> bool:
        return self.checkpoint_path is not None and self.checkpoint_path.is_file()

    # -- writers -----------------------------------------------------------------------------------
    def log(self, message: str, flush: bool = False) -> None:
        """A timestamped line in ``train.log`` (rewritten atomically on ``flush``) and on the logger."""
        if self.echo:
            logger.info(message)
        if not self.enabled:
            return
        self._log_lines.append(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}")
        if flush:
            self.flush_log()

    def flush_log(self) -> None:
        if self.enabled:
            atomic_write_text(self.path / "train.log", "\n".join(self._log_lines) + "\n")

    def write_config(self, config: dict[str, Any]) -> None:
        if self.enabled:
            atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def write_history(self, history: list[dict[str, Any]]) -> None:
        if self.enabled:
            text = "".join(json.dumps(_finite(rec), sort_keys=True) + "\n" for rec in history)
            atomic_write_text(self.path / "history.jsonl", text)

    def write_json(self, name: str, obj: Any) -> None:
        """``metrics.json`` and friends."""
        if self.enabled:
            atomic_write_json(self.path / name, _finite(obj))

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        if self.enabled:
            save_checkpoint(self.checkpoint_path, state)

    def load_checkpoint(self, data_hash: str | None, map_location: Any = "cpu") -> dict[str, Any]:
        return load_checkpoint(self.checkpoint_path, data_hash=data_hash, map_location=map_location)

    def plot(self, history: list[dict[str, Any]], monitor: str | None = None, force: bool = True,
             min_interval: float = 60.0) -> None:
        """Write ``curves.png``; unless ``force``, at most once per ``min_interval`` seconds (a plot
        costs about a second: mid-run refreshes are throttled, the final one is not)."""
        if not (self.enabled and history):
            return
        now = time.monotonic()
        if not force and now - self._last_plot < min_interval:
            return
        png = plot_history(history, monitor)
        atomic_write(self.path / "curves.png", lambda p: p.write_bytes(png))
        self._last_plot = now


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def plot_history(history: list[dict[str, Any]], monitor: str | None = None) -> bytes:
    """PNG bytes: one panel per training term (loss, neg_ll, kl, beta, ...) and one for ``monitor``."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    epochs = [rec["epoch"] for rec in history]
    terms = [k for k in history[-1].get("train", {})  # terms that are 0 throughout (an unused l2) are left out
             if any(rec.get("train", {}).get(k, 0.0) != 0.0 for rec in history)]
    panels: list[tuple[str, list[float], bool]] = []
    for term in terms:
        panels.append((f"train {term}", [rec.get("train", {}).get(term, math.nan) for rec in history], False))
    if monitor is not None and any(monitor in rec.get("valid", {}) for rec in history):
        panels.append((f"valid {monitor}", [rec.get("valid", {}).get(monitor, math.nan) for rec in history], True))
    if not panels:
        panels.append(("(nothing logged)", [math.nan] * len(epochs), False))
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows))
    for i, (title, values, is_metric) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.plot(epochs, values, marker="o" if len(epochs) < 30 else None, ms=3)
        if is_metric:
            finite = [(v, e) for v, e in zip(values, epochs) if v == v]
            if finite:
                best = max(v for v, _ in finite)
                at = next(e for v, e in finite if v == best)  # the first best epoch, as training keeps
                ax.axvline(at, color="grey", ls="--", lw=0.8)
                ax.set_title(f"{title} (best {best:.4f} @ {at})", fontsize=9)
        if not is_metric:
            ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.12 / nrows, top=1 - 0.08 / nrows, wspace=0.3,
                        hspace=0.45)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()
