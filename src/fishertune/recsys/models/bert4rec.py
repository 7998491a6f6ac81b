"""BERT4Rec (Sun et al., 2019): a bidirectional Transformer trained by cloze (masked-item) prediction.

Each training sequence (a user's last ``max_len`` training items) has every item replaced by a
``[MASK]`` token (id ``n_items + 1``) with probability ``mask_prob``; the model predicts the masked
items over all items (softmax cross-entropy). To score, ``[MASK]`` is appended after the user's last
``max_len - 1`` items and its prediction ranks the items.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from fishertune.recsys.models.base import register_model
from fishertune.recsys.models.sasrec import SequentialConfig, SequentialRecommender

__all__ = ["BERT4Rec", "BERT4RecConfig"]


class BERT4RecConfig(SequentialConfig):
    name: Literal["bert4rec"] = "bert4rec"
    num_heads: int = Field(2, ge=1)
    mask_prob: float = Field(0.2, gt=0, lt=1)


@register_model("bert4rec")
class BERT4Rec(SequentialRecommender):
    config_class = BERT4RecConfig
    cfg: BERT4RecConfig

    def __init__(self, cfg: BERT4RecConfig, n_users: int, n_items: int) -> None:
        super().__init__(cfg, n_users, n_items)
        self.train_len = cfg.max_len
        self.mask_token = n_items + 1
        d = cfg.hidden_size
        self.item_emb = nn.Embedding(n_items + 2, d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.emb_ln = nn.LayerNorm(d)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(d, cfg.num_heads, dim_feedforward=4 * d, dropout=cfg.dropout,
                                           activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d))
        self.out_bias = nn.Parameter(torch.zeros(n_items))
        nn.init.trunc_normal_(self.item_emb.weight, std=0.02)
        nn.init.trunc_normal_(self.pos_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def encode(self, seqs: Tensor, attention: list[Tensor] | None = None) -> Tensor:
        """``B x L x d`` hidden states of left-padded ``seqs``; every non-pad position sees all others.
        ``attention``: a list that receives each layer's ``B x heads x L x L`` attention weights (for
        visualisation: the layers then run one by one, each attention computed twice)."""
        L = seqs.shape[1]
        x = self.item_emb(seqs) + self.pos_emb(torch.arange(L, device=seqs.device) + (self.cfg.max_len - L))
        x = self.emb_dropout(self.emb_ln(x))
        pad = seqs == 0
        if attention is None:
            return self.encoder(x, src_key_padding_mask=pad)
        for layer in self.encoder.layers:  # post-norm layers: self_attn sees the layer's input
            attention.append(layer.self_attn(x, x, x, key_padding_mask=pad, need_weights=True,
                                             average_attn_weights=False)[1])
            x = layer(x, src_key_padding_mask=pad)
        return x

    def logits(self, h: Tensor) -> Tensor:
        return self.head(h) @ self.item_emb.weight[1:self.n_items + 1].T + self.out_bias

    def cloze(self, seqs: Tensor) -> tuple[Tensor, Tensor]:
        """``(inputs, labels)``: each non-pad item masked with probability ``mask_prob`` (global torch
        RNG); labels hold the masked items' 0-based index and -100 elsewhere."""
        real = seqs > 0
        masked = real & (torch.rand(seqs.shape, device=seqs.device) < self.cfg.mask_prob)
        inputs = torch.where(masked, torch.full_like(seqs, self.mask_token), seqs)
        labels = torch.where(masked, seqs - 1, torch.full_like(seqs, -100))
        return inputs, labels

    def training_step(self, batch: Tensor, step: int) -> dict[str, Tensor]:
        inputs, labels = self.cloze(self.train_seqs[batch])
        keep = labels >= 0
        h = self.encode(inputs)[keep]
        loss = nn.functional.cross_entropy(self.logits(h).float(), labels[keep], reduction="sum")
        return {"loss": loss / keep.sum().clamp(min=1)}

    def scoring_input(self, users: Tensor, history: Tensor) -> Tensor:
        """The ``B x max_len`` sequences :meth:`score` encodes: the last ``max_len - 1`` items and ``[MASK]``."""
        seqs = self.history_sequences(users, history, self.cfg.max_len - 1)
        return torch.cat([seqs, torch.full_like(seqs[:, :1], self.mask_token)], dim=1)

    def score(self, users: Tensor, history: Tensor) -> Tensor:
        return self.logits(self.encode(self.scoring_input(users, history))[:, -1])
