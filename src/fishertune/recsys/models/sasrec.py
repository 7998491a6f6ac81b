"""SASRec (Kang & McAuley, 2018): causal self-attention over a user's item sequence.

Item embedding (scaled by sqrt(d)) + learned positional embedding, dropout, ``num_layers`` blocks as in
the authors' code (query LayerNorm before attention, residual, LayerNorm, point-wise feed-forward with
residual, padded positions zeroed), a final LayerNorm; item scores are dot products with the shared item
embedding. Loss ``bce``: one uniformly sampled negative per position (the paper); ``ce``: softmax
cross-entropy over all items.

Sequential models get their per-user sequences from :meth:`SequentialRecommender.prepare` (called by
the training loop), train on batches of user indices from :meth:`SequentialRecommender.batch_source`,
and score from the stored sequence filtered by the ``history`` rows (so the validation and test inputs
of a leave-one-out split give the right sequences).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from fishertune.config import StrictModel
from fishertune.recsys.data.types import Split
from fishertune.recsys.models.base import Recommender, register_model
from fishertune.recsys.sequences import (
    compact_by_history,
    filter_sequences,
    pad_last,
    split_sequences,
)

__all__ = ["SASRec", "SASRecConfig", "SequentialRecommender"]


class SequentialConfig(StrictModel):
    """The settings every sequence model has (each model names itself and adds its own)."""

    name: str
    hidden_size: int = Field(64, ge=1)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(1, ge=1)
    max_len: int = Field(50, ge=2)
    dropout: float = Field(0.2, ge=0, lt=1)


class SequentialRecommender(Recommender):
    """Base of sequence models: holds padded sequences as non-persistent buffers (re-made by
    :meth:`prepare`, so the state dict is data-independent)."""

    iterative: ClassVar[bool] = True
    train_len: int  # columns of the training-sequence buffer

    def __init__(self, cfg: SequentialConfig, n_users: int, n_items: int) -> None:
        super().__init__(cfg, n_users, n_items)
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"{cfg.name}: hidden_size {cfg.hidden_size} is not divisible by num_heads "
                             f"{cfg.num_heads}")
        self.max_len = cfg.max_len
        self.register_buffer("train_seqs", torch.zeros(n_users, 1, dtype=torch.long), persistent=False)
        self.register_buffer("all_seqs", torch.zeros(n_users, 1, dtype=torch.long), persistent=False)
        self.prepared = False

    def prepare(self, split: Split) -> None:
        """Build the training sequences (``split.train`` items in time order) and the scoring sequences
        (every event, filtered by ``history`` at scoring time)."""
        if split.n_users != self.n_users or split.n_items != self.n_items:
            raise ValueError(f"{self.name}: the split has {split.n_users} users x {split.n_items} items, the "
                             f"model was built for {self.n_users} x {self.n_items}")
        indptr, items = split_sequences(split)
        t_ptr, t_items = filter_sequences(indptr, items, split.train)
        extra = int((np.diff(indptr) - np.diff(t_ptr)).max(initial=0))  # events beyond train per user
        device = self.train_seqs.device
        self.train_seqs = torch.from_numpy(pad_last(t_ptr, t_items, self.train_len)).to(device)
        self.all_seqs = torch.from_numpy(pad_last(indptr, items, self.max_len + extra)).to(device)
        self.prepared = True

    def batch_source(self, split: Split, device: torch.device) -> tuple[Callable[[np.ndarray], Tensor], np.ndarray]:
        """``(users -> batch, training users)`` for the training loop: a batch is the users' indices."""
        if not self.prepared:
            self.prepare(split)
        users = np.flatnonzero((self.train_seqs > 0).sum(1).cpu().numpy() >= 2)
        return (lambda batch: torch.from_numpy(np.asarray(batch, dtype=np.int64)).to(device)), users

    def history_sequences(self, users: Tensor, history: Tensor, length: int) -> Tensor:
        """``B x length`` left-padded sequences of the users' items that are in ``history``."""
        if not self.prepared:
            raise RuntimeError(f"{self.name}: call prepare(split) (the training loop does) before scoring")
        self._check_history(history)
        return compact_by_history(self.all_seqs[users], history, length)


class SASRecConfig(SequentialConfig):
    name: Literal["sasrec"] = "sasrec"
    loss: Literal["bce", "ce"] = "bce"


class _FeedForward(nn.Module):
    def __init__(self, d: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, d), nn.Dropout(dropout), nn.ReLU(), nn.Linear(d, d),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


@register_model("sasrec")
class SASRec(SequentialRecommender):
    config_class = SASRecConfig
    cfg: SASRecConfig

    def __init__(self, cfg: SASRecConfig, n_users: int, n_items: int) -> None:
        super().__init__(cfg, n_users, n_items)
        self.train_len = cfg.max_len + 1  # inputs = seq[:-1], targets = seq[1:]
        d = cfg.hidden_size
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.attn_ln = nn.ModuleList(nn.LayerNorm(d, eps=1e-8) for _ in range(cfg.num_layers))
        self.attn = nn.ModuleList(nn.MultiheadAttention(d, cfg.num_heads, dropout=cfg.dropout, batch_first=True)
                                  for _ in range(cfg.num_layers))
        self.ffn_ln = nn.ModuleList(nn.LayerNorm(d, eps=1e-8) for _ in range(cfg.num_layers))
        self.ffn = nn.ModuleList(_FeedForward(d, cfg.dropout) for _ in range(cfg.num_layers))
        self.last_ln = nn.LayerNorm(d, eps=1e-8)
        nn.init.xavier_normal_(self.item_emb.weight)
        nn.init.xavier_normal_(self.pos_emb.weight)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def encode(self, seqs: Tensor, attention: list[Tensor] | None = None) -> Tensor:
        """``B x L x d`` hidden states of left-padded ``seqs`` (``B x L``, item + 1); position ``t`` sees
        positions ``<= t`` only. ``attention``: a list that receives each layer's ``B x heads x L x L``
        attention weights (for visualisation; slower)."""
        L = seqs.shape[1]
        pad = (seqs == 0).unsqueeze(-1)
        x = self.item_emb(seqs) * math.sqrt(self.cfg.hidden_size)
        x = x + self.pos_emb(torch.arange(L, device=seqs.device) + (self.cfg.max_len - L))
        x = self.emb_dropout(x).masked_fill(pad, 0.0)
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool, device=seqs.device), diagonal=1)
        for ln_q, attn, ln_f, ffn in zip(self.attn_ln, self.attn, self.ffn_ln, self.ffn):
            q = ln_q(x)
            out, weights = attn(q, x, x, attn_mask=causal, need_weights=attention is not None,
                                average_attn_weights=False)
            if attention is not None:
                attention.append(weights)
            x = ffn(ln_f(q + out)).masked_fill(pad, 0.0)
        return self.last_ln(x)

    def item_weights(self) -> Tensor:
        return self.item_emb.weight[1:]

    def training_step(self, batch: Tensor, step: int) -> dict[str, Tensor]:
        seqs = self.train_seqs[batch]
        inputs, targets = seqs[:, :-1], seqs[:, 1:]
        valid = (targets > 0) & (inputs > 0)
        h = self.encode(inputs)[valid]  # N x d
        pos = targets[valid]
        n = valid.sum().clamp(min=1)
        if self.cfg.loss == "ce":
            logits = h @ self.item_weights().T
            loss = nn.functional.cross_entropy(logits.float(), pos - 1, reduction="sum") / n
        else:
            neg = torch.randint(1, self.n_items + 1, pos.shape, device=pos.device)
            if self.n_items > 1:
                neg = torch.where(neg == pos, neg % self.n_items + 1, neg)
            pos_logit = (h * self.item_emb(pos)).sum(-1).float()
            neg_logit = (h * self.item_emb(neg)).sum(-1).float()
            loss = (nn.functional.softplus(-pos_logit) + nn.functional.softplus(neg_logit)).sum() / n
        return {"loss": loss}

    def scoring_input(self, users: Tensor, history: Tensor) -> Tensor:
        """The ``B x max_len`` sequences :meth:`score` encodes (its last position ranks the items)."""
        return self.history_sequences(users, history, self.cfg.max_len)

    def score(self, users: Tensor, history: Tensor) -> Tensor:
        h = self.encode(self.scoring_input(users, history))[:, -1]
        return h @ self.item_weights().T
