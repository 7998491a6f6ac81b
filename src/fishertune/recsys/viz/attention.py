"""Attention of sequential recommenders (SASRec, BERT4Rec): every layer and head for one user, and
layer- / position-wise summaries over many users.

The sequence shown is the one the model scores from at ``stage`` (``test``: every item but the test
target; BERT4Rec's ends with the ``[MASK]`` whose prediction ranks the items), so the map explains the
ranking the evaluation saw. Rows are query positions, columns the attended (key) positions; each row
of a head sums to 1 over all positions. SASRec (as in its reference PyTorch port) masks only the
future, so a real position may also give weight to left padding: the share is reported as ``pad
mass`` and the maps show the real positions only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fishertune.recsys.data.types import Split
from fishertune.recsys.viz._common import item_labels, lookup_id, new_figure, py, save_png, stage_rows

__all__ = ["UserAttention", "attention_weights", "user_attention", "plot_attention", "attention_summary",
           "plot_attention_summary", "require_sequential"]


def require_sequential(model: Any) -> None:
    """Raise ``ValueError`` unless ``model`` is a sequential model with attention (SASRec, BERT4Rec)."""
    from fishertune.recsys.models.sasrec import SequentialRecommender

    if not (isinstance(model, SequentialRecommender) and hasattr(model, "scoring_input")):
        raise ValueError(f"the attention views need a sequential model (sasrec, bert4rec); this run trains "
                         f"'{getattr(model, 'name', type(model).__name__)}'")


@torch.no_grad()
def attention_weights(model: Any, seqs: Tensor) -> Tensor:
    """``B x layers x heads x L x L`` attention weights of ``model`` on padded ``seqs`` (eval mode)."""
    require_sequential(model)
    was_training = model.training
    model.eval()
    try:
        maps: list[Tensor] = []
        model.encode(seqs, attention=maps)
    finally:
        model.train(was_training)
    return torch.stack(maps, dim=1).float()


@dataclass
class UserAttention:
    """One user's attention maps over the real (non-padding) positions of the scored sequence."""

    user: Any  # original user ID
    stage: str
    items: np.ndarray  # item index per position (-1: BERT4Rec's [MASK])
    labels: list[str]
    weights: np.ndarray  # layers x heads x n x n
    pad_mass: np.ndarray  # layers x heads: mean attention a real position gives to padding


def user_attention(model: Any, split: Split, user: str | int, stage: str = "test",
                   titles: dict[Any, str] | None = None) -> UserAttention:
    """Attention of every layer and head for the user with original ID ``user`` at ``stage``."""
    require_sequential(model)
    u = lookup_id(split.user_ids, user, "user")
    rows = stage_rows(split, stage)
    if rows[u].nnz == 0:
        raise ValueError(f"user {user} has no history in the {stage} stage: nothing to attend to")
    device = model.device()
    history = torch.from_numpy(rows[u].toarray()).to(device)
    seqs = model.scoring_input(torch.tensor([u], device=device), history)
    w = attention_weights(model, seqs)[0].cpu()  # layers x heads x L x L
    real = (seqs[0] > 0).cpu()
    keep = real.nonzero().squeeze(1)
    pad_mass = (w[..., keep, :][..., ~real].sum(-1)).mean(-1).numpy() if (~real).any() else \
        np.zeros(w.shape[:2], dtype=np.float32)
    tokens = seqs[0, keep].cpu().numpy()
    items = np.where(tokens <= split.n_items, tokens - 1, -1)
    labels = item_labels(split, np.maximum(items, 0), titles)
    labels = [lab if it >= 0 else "[MASK]" for lab, it in zip(labels, items)]
    return UserAttention(py(split.user_ids.to_original([u])[0]), stage, items, labels,
                         w[..., keep, :][..., keep].numpy(), np.asarray(pad_mass))


def plot_attention(att: UserAttention, path: str | Path, max_ticks: int = 30) -> Path:
    """A PNG grid, one heat map per (layer, head): rows = query positions, columns = attended items."""
    n_layers, n_heads, n, _ = att.weights.shape
    cell = max(2.6, min(6.0, 0.16 * n + 1.5))
    fig = new_figure(cell * n_heads + 1.0, cell * n_layers + 0.6)
    vmax = float(att.weights.max()) if att.weights.size else 1.0
    step = max(1, int(np.ceil(n / max_ticks)))
    ticks = np.arange(0, n, step)
    image = None
    for layer in range(n_layers):
        for head in range(n_heads):
            ax = fig.add_subplot(n_layers, n_heads, layer * n_heads + head + 1)
            image = ax.imshow(att.weights[layer, head], cmap="viridis", vmin=0.0, vmax=vmax,
                              interpolation="nearest", aspect="equal")
            pad = att.pad_mass[layer, head]
            ax.set_title(f"layer {layer + 1} head {head + 1}" + (f" (pad mass {pad:.2f})" if pad > 1e-3 else ""),
                         fontsize=8)
            ax.set_xticks(ticks, [att.labels[i] for i in ticks], rotation=90, fontsize=5)
            ax.set_yticks(ticks, [att.labels[i] for i in ticks], fontsize=5)
            if layer == n_layers - 1:
                ax.set_xlabel("attended item (oldest left)", fontsize=7)
            if head == 0:
                ax.set_ylabel("query position", fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=fig.axes, shrink=0.6, label="attention weight")
    fig.suptitle(f"user {att.user}: attention at the {att.stage} stage ({n} positions)", fontsize=10)
    return save_png(fig, path)


@torch.no_grad()
def attention_summary(model: Any, split: Split, stage: str = "test", n_users: int = 1000, seed: int = 0,
                      batch_size: int = 256) -> dict[str, Any]:
    """Layer- and position-wise statistics over up to ``n_users`` users (a seeded sample of those with
    a history at ``stage``), per layer and head (arrays ``layers x heads [x ...]``):

    - ``last_by_distance[d]``: mean weight the last (predicting) position gives to the item ``d``
      places before it (``d = 0``: itself, BERT4Rec's ``[MASK]``), over users with a real item there;
    - ``by_lag[o]`` (``o = -(L-1) .. L-1``, ``o = query - key``): mean weight between real positions ``o``
      apart, over all real query positions;
    - ``entropy`` (nats) and ``mean_distance`` (positions) of the real query rows, ``self_weight``
      (the diagonal) and ``pad_mass`` (weight on padding).
    """
    require_sequential(model)
    rows = stage_rows(split, stage)
    users = np.flatnonzero(np.diff(rows.indptr) > 0)
    if users.size == 0:
        raise ValueError(f"no user has a history in the {stage} stage")
    if users.size > n_users:
        users = np.sort(np.random.default_rng(seed).choice(users, n_users, replace=False))
    device = model.device()
    sums: dict[str, Tensor] = {}
    counts: dict[str, Tensor] = {}

    def add(name: str, value: Tensor, count: Tensor) -> None:
        sums[name] = sums[name] + value if name in sums else value
        counts[name] = counts[name] + count if name in counts else count

    L = None
    for start in range(0, users.size, batch_size):
        ub = users[start:start + batch_size]
        history = torch.from_numpy(rows[ub].toarray()).to(device)
        seqs = model.scoring_input(torch.from_numpy(ub).to(device), history)
        w = attention_weights(model, seqs).double()  # B x Ly x H x L x L
        real = seqs > 0  # B x L
        L = seqs.shape[1]
        pos = torch.arange(L, device=device)
        lag = (pos[:, None] - pos[None, :]) + (L - 1)  # L x L, 0 .. 2L-2
        pair = (real[:, :, None] & real[:, None, :]).double()  # B x L x L
        qn = real.double().sum()
        # last position, by distance from the end
        add("last_by_distance", (w[..., -1, :] * real[:, None, None, :]).sum(0).flip(-1),
            real.double().sum(0).flip(-1))
        # by lag over real pairs
        flat_w = (w * pair[:, None, None]).sum(0).flatten(-2)  # Ly x H x L*L
        lag_sum = torch.zeros(*flat_w.shape[:2], 2 * L - 1, dtype=torch.float64, device=device)
        lag_sum.index_add_(-1, lag.flatten(), flat_w)
        lag_cnt = torch.zeros(2 * L - 1, dtype=torch.float64, device=device).index_add_(
            0, lag.flatten(), pair.sum(0).flatten())
        add("by_lag", lag_sum, lag_cnt)
        rq = real.double()[:, None, None, :]  # real query rows
        ent = -(w.clamp_min(1e-30).log() * w).sum(-1)
        add("entropy", (ent * rq).sum((0, -1)), qn)
        dist = (w * (pos[:, None] - pos[None, :]).abs().double() * real[:, None, None, None, :]).sum(-1)
        add("mean_distance", (dist * rq).sum((0, -1)), qn)
        add("self_weight", (w.diagonal(dim1=-2, dim2=-1) * rq).sum((0, -1)), qn)
        pad = (w * (~real)[:, None, None, None, :]).sum(-1)
        add("pad_mass", (pad * rq).sum((0, -1)), qn)
    out: dict[str, Any] = {"stage": stage, "n_users": int(users.size), "max_len": int(L),
                           "model": model.name, "lags": list(range(-(L - 1), L))}
    for name in sums:
        out[name] = (sums[name] / counts[name].clamp_min(1)).cpu().numpy().tolist()
    return out


def plot_attention_summary(summary: dict[str, Any], path: str | Path) -> Path:
    """PNG: per layer, the last position's attention by distance and the attention by lag (a line per
    head), and bars of entropy / mean distance / pad mass per layer and head."""
    last = np.asarray(summary["last_by_distance"])  # Ly x H x L
    by_lag = np.asarray(summary["by_lag"])
    n_layers, n_heads, L = last.shape
    fig = new_figure(12.0, 3.0 * (n_layers + 1))
    lags = np.asarray(summary["lags"])
    for layer in range(n_layers):
        ax = fig.add_subplot(n_layers + 1, 2, 2 * layer + 1)
        for head in range(n_heads):
            ax.plot(np.arange(L), last[layer, head], marker="o", ms=2, label=f"head {head + 1}")
        ax.set_title(f"layer {layer + 1}: last position's attention by distance", fontsize=9)
        ax.set_xlabel("items before the predicting position (0 = itself)", fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        ax = fig.add_subplot(n_layers + 1, 2, 2 * layer + 2)
        for head in range(n_heads):
            ax.plot(lags, by_lag[layer, head], lw=1, label=f"head {head + 1}")
        ax.set_title(f"layer {layer + 1}: mean attention by lag (query - key)", fontsize=9)
        ax.set_xlabel("lag (positive: an earlier item)", fontsize=8)
        ax.grid(alpha=0.3)
    names = [("entropy", "entropy (nats)"), ("mean_distance", "mean distance"), ("pad_mass", "pad mass")]
    for i, (key, title) in enumerate(names):
        ax = fig.add_subplot(n_layers + 1, 3, 3 * n_layers + i + 1)
        vals = np.asarray(summary[key])
        x = np.arange(n_layers)
        width = 0.8 / n_heads
        for head in range(n_heads):
            ax.bar(x + head * width, vals[:, head], width, label=f"head {head + 1}")
        ax.set_xticks(x + 0.4 - width / 2, [f"layer {i + 1}" for i in x], fontsize=8)
        ax.set_title(title, fontsize=9)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle(f"{summary['model']}: attention over {summary['n_users']:,} users at the "
                 f"{summary['stage']} stage", fontsize=10)
    fig.subplots_adjust(hspace=0.6, wspace=0.3)
    return save_png(fig, path)
