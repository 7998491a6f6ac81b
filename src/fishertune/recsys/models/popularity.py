"""Popularity: every user gets the items ranked by how many training users interacted with them."""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from fishertune.config import StrictModel
from fishertune.recsys.models.base import Recommender, register_model


class PopularityConfig(StrictModel):
    name: Literal["popularity"] = "popularity"


@register_model("popularity")
class Popularity(Recommender):
    """Closed form: the score of an item is its number of training interactions (binary)."""

    config_class = PopularityConfig

    def __init__(self, cfg: PopularityConfig, n_users: int, n_items: int) -> None:
        super().__init__(cfg, n_users, n_items)
        self.register_buffer("counts", torch.zeros(n_items))

    def fit(self, train: sp.csr_matrix) -> None:
        if train.shape[1] != self.n_items:
            raise ValueError(f"Popularity.fit: train has {train.shape[1]} items, the model {self.n_items}")
        train = sp.csr_matrix(train, copy=True)
        train.sum_duplicates()
        train.eliminate_zeros()
        counts = np.bincount(train.indices, minlength=self.n_items)
        self.counts.copy_(torch.from_numpy(counts.astype(np.float32)))

    def score(self, users: Tensor, history: Tensor) -> Tensor:
        self._check_history(history)
        return self.counts.to(history.dtype).expand(history.shape[0], -1)
