"""Training curves of a run directory, from ``history.jsonl`` (one record per epoch: the mean of every
term the model logs, e.g. Mult-VAE's ``loss``, ``neg_ll``, ``kl``, ``beta``, and the validation metrics).

For Mult-VAE the figure separates total loss and reconstruction term (``neg_ll``, the multinomial
negative log-likelihood), the KL term, and the annealing schedule ``beta = min(anneal_cap, step /
total_anneal_steps)``: the epoch means logged by training and the schedule's value at each epoch's last
step from the run's config. Other models get one panel per logged term
(:func:`fishertune.recsys.rundir.plot_history`). Needs no data: only the run directory's files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fishertune.config import read_yaml
from fishertune.recsys.viz._common import new_figure, save_png

__all__ = ["read_history", "plot_curves"]


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of ``run_dir/history.jsonl``."""
    path = Path(run_dir) / "history.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no history.jsonl (not a run directory, or not trained yet)")
    history = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not history:
        raise ValueError(f"{path} is empty: no epoch has finished")
    return history


def _series(history: list[dict[str, Any]], group: str, key: str) -> list[float]:
    out = []
    for rec in history:
        value = rec.get(group, {}).get(key, math.nan)
        out.append(float(value) if isinstance(value, (int, float)) else math.nan)
    return out


def plot_curves(run_dir: str | Path, path: str | Path) -> Path:
    """Write the training curves of ``run_dir`` to ``path`` (PNG)."""
    run_dir = Path(run_dir)
    history = read_history(run_dir)
    cfg = read_yaml(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else {}
    model = cfg.get("model", {}) or {}
    monitor = (cfg.get("train", {}) or {}).get("monitor")
    if model.get("name") != "multvae":
        from fishertune.recsys.rundir import plot_history
        from fishertune.utils.io import atomic_write_bytes

        return atomic_write_bytes(path, plot_history(history, monitor))
    epochs = [rec["epoch"] for rec in history]
    fig = new_figure(13.0, 7.0)
    ax = fig.add_subplot(2, 2, 1)
    ax.plot(epochs, _series(history, "train", "loss"), label="total (neg_ll + beta KL)")
    ax.plot(epochs, _series(history, "train", "neg_ll"), label="reconstruction (neg_ll)")
    ax.set_title("training loss", fontsize=10)
    ax.legend(fontsize=8)
    ax = fig.add_subplot(2, 2, 2)
    ax.plot(epochs, _series(history, "train", "kl"), color="tab:purple")
    ax.set_title("KL(q(z|x) || p(z))", fontsize=10)
    ax = fig.add_subplot(2, 2, 3)
    ax.plot(epochs, _series(history, "train", "beta"), marker="o", ms=3, label="beta, epoch mean (logged)")
    cap, total = model.get("anneal_cap"), model.get("total_anneal_steps")
    if cap is not None and total is not None and all("step" in rec for rec in history):
        from fishertune.recsys.models.vae import kl_annealing

        ax.plot(epochs, [kl_annealing(int(rec["step"]), float(cap), int(total)) for rec in history], ls="--",
                label=f"min({cap}, step / {total}) at epoch end")
    ax.set_title("KL annealing schedule", fontsize=10)
    ax.legend(fontsize=8)
    ax = fig.add_subplot(2, 2, 4)
    if monitor and any(monitor in rec.get("valid", {}) for rec in history):
        values = _series(history, "valid", monitor)
        ax.plot(epochs, values, color="tab:green")
        finite = [(v, e) for v, e in zip(values, epochs) if v == v]
        if finite:
            best, at = max(finite, key=lambda t: t[0])
            ax.axvline(at, color="grey", ls="--", lw=0.8)
            ax.set_title(f"valid {monitor} (best {best:.4f} @ {at})", fontsize=10)
    else:
        ax.set_title("(no validation metric logged)", fontsize=10)
    for ax in fig.axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{run_dir.name}: Mult-VAE training", fontsize=11)
    fig.subplots_adjust(hspace=0.4)
    return save_png(fig, path)
