"""A Fisher report: per-layer bar chart, one heatmap per group (layer), a histogram of the entries, and
the capacity metrics, as PNG files and a markdown summary."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor
from torch.nn import functional as F

from fishertune.fisher.analysis import capacity_metrics
from fishertune.fisher.reductions import per_layer, reduce
from fishertune.utils.io import atomic_write, atomic_write_text


def _savefig(fig, path: Path) -> None:
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))


def _heat(t: Tensor, max_side: int = 256) -> Tensor:
    """A 2-D view of a parameter's Fisher, average-pooled to at most ``max_side`` per side."""
    t = t.detach().double().cpu()
    if t.dim() == 1:
        t = t[None, :]
    elif t.dim() > 2:
        t = t.reshape(t.shape[0], -1)
    h, w = min(t.shape[0], max_side), min(t.shape[1], max_side)
    if (h, w) != tuple(t.shape):
        t = F.adaptive_avg_pool2d(t[None, None], (h, w))[0, 0]
    return t


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "root"


def write_report(fisher: Mapping[str, Tensor], out_dir: str | Path, meta: Mapping | None = None,
                 by: str = "layer", max_heatmaps: int = 24, title: str = "Fisher report") -> Path:
    """Write ``report.md`` and PNGs into ``out_dir``; returns the markdown path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    n = int(meta.get("n_samples") or 1)
    metrics = capacity_metrics(fisher, n_samples=n)
    by_ = by if by in ("parameter", "layer", "channel") else "layer"
    groups = reduce(fisher, by_ if by_ != "channel" else "layer")
    layers = per_layer(fisher)
    order = sorted(groups, key=lambda k: -float(groups[k]))

    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(order) + 2), 4))
    vals = [float(groups[k]) for k in order]
    ax.bar(range(len(order)), vals, color="#3b6ea8")
    ax.set_xticks(range(len(order)), order, rotation=75, ha="right", fontsize=7)
    ax.set_yscale("log" if any(v > 0 for v in vals) else "linear")
    ax.set_ylabel("Fisher trace")
    ax.set_title(f"Fisher trace per {by_}")
    _savefig(fig, out / f"per_{by_}.png")
    plt.close(fig)

    flat = torch.cat([t.detach().double().reshape(-1).cpu() for t in fisher.values()])
    pos = flat[flat > 0]
    fig, ax = plt.subplots(figsize=(6, 4))
    if pos.numel():
        ax.hist(torch.log10(pos).numpy(), bins=80, color="#a83b3b")
    ax.set_xlabel("log10 Fisher (entries > 0)")
    ax.set_ylabel("count")
    ax.set_title(f"{pos.numel():,} positive of {flat.numel():,} entries")
    _savefig(fig, out / "histogram.png")
    plt.close(fig)

    heatmaps = []
    top_layers = sorted(layers, key=lambda k: -float(layers[k]))[:max_heatmaps]
    for layer in top_layers:
        names = [nm for nm in fisher if (nm.rsplit(".", 1)[0] if "." in nm else "<root>") == layer]
        big = max(names, key=lambda nm: fisher[nm].numel())
        h = _heat(fisher[big])
        fig, ax = plt.subplots(figsize=(5, 4))
        im = ax.imshow(torch.log10(h.clamp_min(1e-30)).numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax, label="log10 Fisher")
        ax.set_title(f"{big} {tuple(fisher[big].shape)}", fontsize=9)
        ax.set_xlabel("input (pooled)" if fisher[big].dim() > 1 else "index")
        ax.set_ylabel("output (pooled)" if fisher[big].dim() > 1 else "")
        fname = f"heatmap_{_safe(layer)}.png"
        _savefig(fig, out / fname)
        plt.close(fig)
        heatmaps.append((layer, big, fname))

    lines = [f"# {title}", ""]
    if meta:
        keys = [k for k in ("kind", "likelihood", "n_samples", "n_batches", "skipped_batches", "source", "task")
                if k in meta]
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
                  "| " + " | ".join(str(meta[k]) for k in keys) + " |", ""]
    lines += ["## Capacity", "", "| metric | value |", "|---|---:|"]
    for k, v in metrics.items():
        lines.append(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v:,} |")
    lines += ["", f"## Fisher trace per {by_}", "", f"![per {by_}](per_{by_}.png)", "",
              f"| {by_} | trace | share |", "|---|---:|---:|"]
    total = sum(vals) or 1.0
    for k in order[:50]:
        lines.append(f"| {k} | {float(groups[k]):.4g} | {float(groups[k]) / total:.1%} |")
    lines += ["", "## Distribution", "", "![histogram](histogram.png)", "", "## Heatmaps", ""]
    for layer, big, fname in heatmaps:
        lines += [f"### {layer}: {big}", "", f"![{layer}]({fname})", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
