"""A finished run, loaded back: its resolved config, its split (from the cache) and its best model.

Used by ``fishertune evaluate`` and ``fishertune predict``. The checkpoint's data hash must match the
data the config resolves to now, so a run is never scored on data it was not trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fishertune.config import load_config
from fishertune.recsys.checkpoint import load_checkpoint
from fishertune.recsys.data import load_split
from fishertune.recsys.data.types import Split
from fishertune.recsys.models import Recommender, build_model


@dataclass
class Run:
    run_dir: Path
    cfg: "ExperimentConfig"  # noqa: F821 - imported lazily to avoid a cycle
    split: Split
    data_hash: str
    model: Recommender


def load_run(run_dir: str | Path) -> Run:
    """Load ``run_dir/config.yaml``, the split it names and the best model of ``checkpoint.pt``."""
    from fishertune.recsys.experiment import ExperimentConfig

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(ExperimentConfig, run_dir / "config.yaml")
    split, data_hash = load_split(cfg.data)
    state = load_checkpoint(run_dir / "checkpoint.pt", data_hash=data_hash)
    model = build_model(cfg.model, n_users=split.n_users, n_items=split.n_items)
    model.load_state_dict(state["model"])
    prepare = getattr(model, "prepare", None)
    if callable(prepare):  # sequential models take their sequences from the split
        prepare(split)
    model.eval()
    return Run(run_dir, cfg, split, data_hash, model)


@torch.no_grad()
def recommend(run: Run, top_k: int = 10, stage: str = "test", batch_size: int = 1024) -> pd.DataFrame:
    """Top-``top_k`` unseen items for every user with a history in ``stage``'s input, original IDs.

    Columns: ``user``, ``rank`` (1 = best), ``item``, ``score``.
    """
    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    history, _ = run.split.stage(stage)
    users = np.flatnonzero(np.diff(history.indptr) > 0)
    if users.size == 0:
        raise ValueError(f"no user has a history in the {stage} stage")
    k = min(top_k, run.split.n_items)
    out_users, out_items, out_scores = [], [], []
    for start in range(0, users.size, batch_size):
        rows = users[start:start + batch_size]
        hist = torch.from_numpy(history[rows].toarray())
        scores = run.model.score(torch.from_numpy(rows), hist).float()
        scores = scores.masked_fill(hist > 0, float("-inf"))
        top = torch.topk(scores, k, dim=1)
        out_users.append(np.repeat(rows, k))
        out_items.append(top.indices.numpy().ravel())
        out_scores.append(top.values.numpy().ravel())
    users_flat = np.concatenate(out_users)
    items_flat = np.concatenate(out_items)
    scores_flat = np.concatenate(out_scores)
    keep = np.isfinite(scores_flat)  # users who have seen nearly every item
    return pd.DataFrame({
        "user": run.split.user_ids.to_original(users_flat[keep]),
        "rank": np.tile(np.arange(1, k + 1), len(users_flat) // k)[keep],
        "item": run.split.item_ids.to_original(items_flat[keep]),
        "score": scores_flat[keep],
    })
