"""The recommender lab's bridge to the Fisher engine: ``fishertune fisher compute RUN_DIR`` measures the
Fisher information of a trained recsys model on its own data.

The core finds :func:`load_model_and_data` lazily (``fishertune.fisher.target``); the core never imports
this module. Autoencoders (Mult-VAE, Mult-DAE) are scored with the multinomial likelihood of each
user's interaction row, the model's own training objective; closed-form models have no parameters to
measure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from fishertune.fisher.target import FisherTarget
from fishertune.recsys.models import Recommender


class ScoringView(nn.Module):
    """``forward(users, history) -> scores``: the recommender's scoring path as a plain module.

    Parameters keep their names under ``model.``; the view holds no state of its own.
    """

    def __init__(self, model: Recommender) -> None:
        super().__init__()
        self.model = model

    def forward(self, users: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        return self.model.score(users, history)


class UserRows:
    """Re-iterable batches ``((users, history), history)`` of the users with >= 1 item in ``matrix``."""

    def __init__(self, matrix: sp.csr_matrix, batch_size: int = 500) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.matrix = matrix
        self.users = np.flatnonzero(np.diff(matrix.indptr) > 0)
        if self.users.size == 0:
            raise ValueError("no user has an interaction in the chosen matrix")
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-self.users.size // self.batch_size)

    def __iter__(self) -> Iterator[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
        for start in range(0, self.users.size, self.batch_size):
            rows = self.users[start:start + self.batch_size]
            history = torch.from_numpy(self.matrix[rows].toarray())
            yield (torch.from_numpy(rows), history), history


def load_model_and_data(path: str | Path, split: str = "train", overrides: Sequence[str] = (),
                        device: str | None = None, batch_size: int = 500) -> FisherTarget:
    """A finished recsys run directory as a Fisher target: its best model and the rows of ``split``
    (``train``, or ``valid`` / ``test``: the fold-in inputs of that stage)."""
    from fishertune.recsys.runs import load_run

    if overrides:
        raise ValueError(f"a run directory takes no overrides (got {list(overrides)}); its config is fixed")
    run = load_run(path)
    if not any(p.requires_grad for p in run.model.parameters()):
        raise ValueError(f"{path}: model '{run.cfg.model.name}' is closed-form and has no trainable "
                         "parameters to measure Fisher information of")
    if split == "train":
        matrix = run.split.train
    elif split in ("valid", "test"):
        matrix = run.split.stage(split)[0]
    else:
        raise ValueError(f"unknown split {split!r}; use train, valid or test")
    return FisherTarget(model=ScoringView(run.model), loader=UserRows(matrix, batch_size),
                        likelihood="multinomial", name=f"{run.cfg.name}/{run.cfg.model.name}",
                        meta={"run_dir": str(path), "split": split, "data_hash": run.data_hash})
