"""Figures: score per block per method; metric kept against the compression ratio per method."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scores(frame: pd.DataFrame, path: str | Path) -> Path:
    """One panel per method: its scores over the blocks, scaled to [0, 1] (max = 1) for comparison."""
    plt = _plt()
    methods = [c for c in frame.columns if not c.startswith("random")]
    n = max(len(methods), 1)
    fig, axes = plt.subplots(n, 1, figsize=(max(6, 0.3 * len(frame)), 1.6 * n), sharex=True, squeeze=False)
    x = np.arange(len(frame))
    for ax, m in zip(axes[:, 0], methods):
        v = frame[m].to_numpy(dtype=float)
        span = np.nanmax(v) - np.nanmin(v)
        ax.bar(x, (v - np.nanmin(v)) / span if span > 0 else np.zeros_like(v), color="tab:blue")
        ax.set_ylabel(m, rotation=0, ha="right", fontsize=8)
        ax.set_yticks([])
    axes[-1, 0].set_xticks(x)
    axes[-1, 0].set_xticklabels(frame.index, rotation=90, fontsize=7)
    fig.suptitle("block importance (min-max scaled per method; higher = kept longer)")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_kept(frame: pd.DataFrame, path: str | Path, title: str = "metric kept") -> Path:
    """Metric kept (compressed / dense) against the block ratio, one line per method; random draws as
    their mean with a min-max band."""
    plt = _plt()
    f = frame.copy()
    f["group"] = f["method"].str.split(":").str[0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g, sub in f.groupby("group", sort=False):
        agg = sub.groupby("blocks_ratio")["kept"].agg(["mean", "min", "max"]).sort_index()
        style = "--" if g in ("last", "random") else "-"
        ax.plot(agg.index, agg["mean"], style, marker="o", label=g)
        if g == "random":
            ax.fill_between(agg.index, agg["min"], agg["max"], alpha=0.2)
    ax.set_xlabel("compression ratio (blocks before / after)")
    ax.set_ylabel("metric kept (compressed / dense)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
