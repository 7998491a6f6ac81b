"""Views of autoencoder recommenders (Mult-VAE, Mult-DAE) and of item vectors in general.

- latent space: the posterior means ``mu(x_u)`` of users in 2-D (PCA; t-SNE when scikit-learn is
  installed), coloured by how many items the user has;
- input vs reconstruction for one user: the softmax of the decoder's logits over all items, where the
  user's input and held-out items fall in it, and the top items;
- item-item similarity: cosine similarity of item vectors, the rows of the decoder's output layer
  (``n_items x hidden``; for SASRec / BERT4Rec the item embeddings), with "similar items" by original
  item ID and MovieLens titles.
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

__all__ = ["latent_means", "project_2d", "LatentView", "latent_view", "plot_latent", "Reconstruction",
           "reconstruction", "plot_reconstruction", "item_vectors", "similar_items", "plot_similar_items",
           "require_vae"]


def require_vae(model: Any, what: str = "this view") -> None:
    """Raise ``ValueError`` unless ``model`` is a Mult-VAE."""
    if getattr(model, "name", None) != "multvae":
        raise ValueError(f"{what} needs a Mult-VAE run (model multvae); this run trains "
                         f"'{getattr(model, 'name', type(model).__name__)}'")


@torch.no_grad()
def latent_means(model: Any, rows: Any, batch_size: int = 1024) -> np.ndarray:
    """``len(rows) x latent_dim`` posterior means of the Mult-VAE for the CSR ``rows`` (eval mode)."""
    require_vae(model, "the latent view")
    model.eval()
    out = []
    device = model.device()
    for start in range(0, rows.shape[0], batch_size):
        x = torch.from_numpy(rows[start:start + batch_size].toarray()).to(device)
        out.append(model.encode(x, train=False)[0].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.cfg.latent_dim), np.float32)


def project_2d(x: np.ndarray, method: str = "pca", seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """``n x 2`` coordinates of ``x`` and notes (``explained`` variance ratio of the two PCA axes).

    ``pca``: the top two principal axes (SVD of the centred data). ``tsne``: scikit-learn's t-SNE
    initialised with PCA (imported only here; a clear error when scikit-learn is missing)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 3:
        raise ValueError(f"need at least 3 points to project, got an array of shape {x.shape}")
    if method == "pca":
        centred = x - x.mean(0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        coords = centred @ vt[:2].T
        if coords.shape[1] < 2:
            coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
        var = s ** 2
        return coords, {"explained": (var[:2] / max(var.sum(), 1e-30)).tolist()}
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError:
            raise ValueError("t-SNE needs scikit-learn (pip install scikit-learn); or use --method pca") from None
        perplexity = float(min(30.0, (x.shape[0] - 1) / 3))
        coords = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(x)
        return np.asarray(coords), {"perplexity": perplexity}
    raise ValueError(f"unknown projection {method!r}; use 'pca' or 'tsne'")


@dataclass
class LatentView:
    coords: np.ndarray  # n x 2
    users: np.ndarray  # original user IDs
    n_items: np.ndarray  # items in each user's row
    method: str
    stage: str
    notes: dict[str, Any]


def latent_view(model: Any, split: Split, stage: str = "train", method: str = "pca", max_users: int = 5000,
                seed: int = 0) -> LatentView:
    """The posterior means of (a seeded sample of up to ``max_users``) users with a row at ``stage``."""
    require_vae(model, "the latent view")
    rows = stage_rows(split, stage)
    users = np.flatnonzero(np.diff(rows.indptr) > 0)
    if users.size > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    if users.size < 3:
        raise ValueError(f"only {users.size} users have a row in the {stage} stage: too few to project")
    sub = rows[users]
    coords, notes = project_2d(latent_means(model, sub), method, seed)
    return LatentView(coords, split.user_ids.to_original(users), np.diff(sub.indptr), method, stage, notes)


def plot_latent(view: LatentView, path: str | Path) -> Path:
    """Scatter of the 2-D latent means coloured by log10 of the user's number of items."""
    fig = new_figure(6.5, 5.5)
    ax = fig.add_subplot(1, 1, 1)
    sc = ax.scatter(view.coords[:, 0], view.coords[:, 1], c=np.log10(view.n_items), s=6, cmap="plasma",
                    alpha=0.7, linewidths=0)
    fig.colorbar(sc, ax=ax, label="log10 items in the user's row")
    if view.method == "pca":
        ev = view.notes.get("explained", [0, 0])
        ax.set_xlabel(f"PC 1 ({100 * ev[0]:.1f} % of variance)")
        ax.set_ylabel(f"PC 2 ({100 * ev[1]:.1f} %)")
    else:
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
    ax.set_title(f"Mult-VAE latent means ({view.method}), {len(view.users):,} users, {view.stage} rows",
                 fontsize=10)
    ax.grid(alpha=0.3)
    return save_png(fig, path)


@dataclass
class Reconstruction:
    user: Any
    stage: str
    probs: np.ndarray  # n_items: softmax of the decoder's logits
    inputs: np.ndarray  # item indices in the input row
    targets: np.ndarray  # held-out item indices of the stage (empty for "train")
    labels: dict[int, str]  # display labels of the items plotted / listed


@torch.no_grad()
def reconstruction(model: Any, split: Split, user: str | int, stage: str | None = None,
                   titles: dict[Any, str] | None = None, top: int = 20) -> Reconstruction:
    """The Mult-VAE's reconstruction (softmax over items, from ``z = mu``) of the user's input row.

    ``stage``: ``train`` (a training user's row), ``valid`` / ``test`` (the fold-in input, with that
    stage's targets); ``None``: the first of test, valid, train where the user has an input."""
    require_vae(model, "the reconstruction view")
    u = lookup_id(split.user_ids, user, "user")
    stages = [stage] if stage else ["test", "valid", "train"]
    for st in stages:
        rows = stage_rows(split, st)
        if rows[u].nnz:
            break
    else:
        raise ValueError(f"user {user} has no input row in the {' / '.join(stages)} stage(s)")
    model.eval()
    device = model.device()
    history = torch.from_numpy(rows[u].toarray()).to(device)
    probs = torch.softmax(model.score(torch.tensor([u], device=device), history).float(), -1)[0].cpu().numpy()
    inputs = rows[u].indices.astype(np.int64)
    targets = split.stage(st)[1][u].indices.astype(np.int64) if st != "train" else np.zeros(0, np.int64)
    shown = np.unique(np.concatenate([np.argsort(-probs)[:top], inputs[:top], targets]))
    labels = dict(zip(shown.tolist(), item_labels(split, shown, titles, width=40)))
    return Reconstruction(py(split.user_ids.to_original([u])[0]), st, probs, inputs, targets, labels)


def plot_reconstruction(rec: Reconstruction, path: str | Path, top: int = 20) -> Path:
    """Left: every item's reconstruction probability by rank (log scale) with the user's input and
    held-out items marked; right: the top items, coloured by input / held-out / new."""
    order = np.argsort(-rec.probs)
    rank = np.empty_like(order)
    rank[order] = np.arange(1, len(order) + 1)
    fig = new_figure(13.0, 5.5)
    ax = fig.add_subplot(1, 2, 1)
    ax.plot(np.arange(1, len(order) + 1), rec.probs[order], color="grey", lw=1, label="all items")
    ax.scatter(rank[rec.inputs], rec.probs[rec.inputs], s=10, color="tab:blue", label="input items", zorder=3)
    if rec.targets.size:
        ax.scatter(rank[rec.targets], rec.probs[rec.targets], s=30, marker="*", color="tab:red",
                   label="held-out items", zorder=4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rank of the item in the reconstruction")
    ax.set_ylabel("reconstruction probability")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(f"user {rec.user}: {rec.inputs.size} input items ({rec.stage})", fontsize=10)
    ax = fig.add_subplot(1, 2, 2)
    top_items = order[:top][::-1]
    inputs, targets = set(rec.inputs.tolist()), set(rec.targets.tolist())
    colors = ["tab:red" if i in targets else "tab:blue" if i in inputs else "tab:grey" for i in top_items]
    ax.barh(np.arange(len(top_items)), rec.probs[top_items], color=colors)
    ax.set_yticks(np.arange(len(top_items)), [rec.labels.get(int(i), str(i)) for i in top_items], fontsize=7)
    ax.set_xlabel("reconstruction probability")
    ax.set_title(f"top {len(top_items)} (blue: input, red: held out, grey: new)", fontsize=10)
    fig.subplots_adjust(wspace=0.6)
    return save_png(fig, path)


def item_vectors(model: Any) -> Tensor:
    """``n_items x d`` item vectors: the output layer's weight rows (Mult-VAE / Mult-DAE decoders) or
    the item embeddings that score items (SASRec, BERT4Rec)."""
    name = getattr(model, "name", type(model).__name__)
    if name == "multvae":
        w = model.decoder[-1].weight
    elif name == "multdae":
        w = model.layers[-1].weight
    elif name in ("sasrec", "bert4rec"):
        w = model.item_emb.weight[1:model.n_items + 1]
    else:
        raise ValueError(f"item similarity needs item vectors: a multvae, multdae, sasrec or bert4rec run; this "
                         f"run trains '{name}'")
    return w.detach().float().cpu()


def similar_items(model: Any, item: int, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, cosine similarities)`` of the ``k`` items most similar to item index ``item``, most
    similar first; the item itself is included (similarity 1, first unless another row is parallel)."""
    vecs = torch.nn.functional.normalize(item_vectors(model), dim=1)
    if not 0 <= item < vecs.shape[0]:
        raise ValueError(f"item index {item} is outside 0..{vecs.shape[0] - 1}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    sims = vecs @ vecs[item]
    top = torch.topk(sims, min(k, len(sims)))
    return top.indices.numpy(), top.values.numpy()


def plot_similar_items(model: Any, split: Split, items: np.ndarray, path: str | Path,
                       titles: dict[Any, str] | None = None) -> Path:
    """Heat map of the cosine similarities among ``items`` (the query first, then its neighbours)."""
    vecs = torch.nn.functional.normalize(item_vectors(model)[torch.from_numpy(np.asarray(items))], dim=1)
    sims = (vecs @ vecs.T).numpy()
    labels = item_labels(split, items, titles, width=40)
    n = len(items)
    fig = new_figure(0.35 * n + 4.0, 0.35 * n + 2.5)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(sims, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(np.arange(n), labels, rotation=90, fontsize=7)
    ax.set_yticks(np.arange(n), labels, fontsize=7)
    fig.colorbar(image, ax=ax, shrink=0.7, label="cosine similarity of item vectors")
    ax.set_title(f"items most similar to {labels[0]}", fontsize=10)
    return save_png(fig, path)
