"""A UniCDR-style universal cross-domain recommender (after Cao et al., WSDM 2023), written anew.

Per domain ``d``: item embeddings ``item_emb.<d>`` and a domain-specific user representation
``specific(u, d) = agg_d(specific_user.<d>[u], items of u in d)``. Across domains: a domain-shared user
representation ``shared(u) = agg_s(shared_user[u], items of u in every domain)``, each item embedded by
its own domain's table. An aggregator mixes the user's ID embedding with a pooled context:
``lambda_a * id + (1 - lambda_a) * W_agg(pool(context))``, ``pool`` being the mean, a user-attention
softmax ``(W_att item) . id`` or a softmax over given item-similarity scores; padding never counts.
The user in domain ``d`` is ``specific + shared`` (UniCDR's Eq. 13, equal weights) and items are scored
by dot product.

Training (per domain batch of (user, positive, negatives)): binary cross-entropy on the positive and
its negatives (UniCDR's) or a softmax over them (``rec_loss``), an optional per-item score bias, plus a contrastive term between the user's specific and shared representations:
``bilinear`` (UniCDR's: a per-domain bilinear discriminator told a user's own pair from a pair with
another user's specific part, BCE) or ``infonce`` (cosine, temperature). The total is
``(1 - w) * rec + w * contrastive``. Contexts come with interaction masking (see ``batches``).

Parameter groups for FisherTune: ``shared`` = the user-shared embedding and the shared aggregator
(what transfers across domains); ``specific`` = per-domain item embeddings, user embeddings,
aggregators and discriminators.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fishertune.recsys.cdr.batches import CDRBatch
from fishertune.recsys.cdr.config import CDRModelConfig

__all__ = ["Aggregator", "UniCDR", "contrastive_loss", "rec_loss"]


class Aggregator(nn.Module):
    """``lambda_a * id + (1 - lambda_a) * W_agg(pool(context))`` with a padding-aware pool."""

    def __init__(self, dim: int, kind: str, lambda_a: float, dropout: float):
        super().__init__()
        if kind not in ("mean", "user_attention", "item_similarity"):
            raise ValueError(f"unknown aggregator {kind!r}; choose mean, user_attention or item_similarity")
        self.kind, self.lambda_a = kind, lambda_a
        self.W_agg = nn.Linear(dim, dim, bias=False)
        if kind == "user_attention":
            self.W_att = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
            self.att_dropout = nn.Dropout(dropout)

    def pool(self, id_emb: Tensor, ctx: Tensor, valid: Tensor, score: Tensor | None) -> Tensor:
        """``B x dim`` pooled context; rows without a valid item pool to zero."""
        any_valid = valid.any(1, keepdim=True)
        if self.kind == "mean":
            w = valid.to(ctx.dtype) / valid.sum(1, keepdim=True).clamp(min=1).to(ctx.dtype)
        else:
            if self.kind == "user_attention":
                logits = torch.einsum("bld,bd->bl", self.W_att(ctx), id_emb)
            else:
                if score is None:
                    raise ValueError("the item_similarity aggregator needs item scores in the batch")
                logits = score.to(ctx.dtype)
            logits = logits.masked_fill(~valid, float("-inf"))
            logits = torch.where(any_valid, logits, torch.zeros_like(logits))
            w = torch.softmax(logits.float(), dim=1).to(ctx.dtype) * valid
            if self.kind == "user_attention":
                w = self.att_dropout(w)
        return torch.einsum("bl,bld->bd", w, ctx)

    def forward(self, id_emb: Tensor, ctx: Tensor, valid: Tensor, score: Tensor | None = None) -> Tensor:
        pooled = self.W_agg(self.pool(id_emb, ctx, valid, score))
        return self.lambda_a * id_emb + (1.0 - self.lambda_a) * pooled


class BilinearCritic(nn.Module):
    """``x1^T A x2 + b`` (what ``nn.Bilinear(dim, dim, 1)`` computes; its CPU kernel is ~10x slower)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        self.bias = nn.Parameter(torch.empty(1))
        bound = 1.0 / math.sqrt(dim)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        return ((x1 @ self.weight) * x2).sum(-1) + self.bias


def rec_loss(kind: str, pos: Tensor, neg: Tensor) -> Tensor:
    """The recommendation term from ``B`` positive and ``B x K`` negative logits.

    ``bce``: ``BCE(pos, 1) + BCE(neg, 0)``, each averaged (UniCDR's); ``softmax``: the cross-entropy of
    the positive among its ``1 + K`` candidates (a sampled softmax: every negative competes with the
    positive, so one step moves the ranking more than ``K`` independent binary terms).
    """
    if kind == "bce":
        return (F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos))
                + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg)))
    if kind == "softmax":
        logits = torch.cat([pos[:, None], neg], 1)
        return F.cross_entropy(logits, torch.zeros(len(pos), dtype=torch.long, device=pos.device))
    raise ValueError(f"unknown rec_loss {kind!r}; choose bce or softmax")


def contrastive_loss(kind: str, specific: Tensor, shared: Tensor, critic: nn.Module | None,
                     shift: int, temperature: float) -> Tensor:
    """The term tying a user's specific and shared representations.

    ``bilinear``: ``BCE(D(s_u, h_u), 1) + BCE(D(s_{u+shift}, h_u), 0)`` (rows rolled by ``shift``);
    ``infonce``: cross-entropy of ``cos(s_u, h_v) / temperature`` over ``v`` with target ``u``.
    """
    if kind == "none" or len(specific) < 2:
        return specific.new_zeros(())
    if kind == "bilinear":
        pos = critic(specific, shared).view(-1).float()
        neg = critic(specific.roll(shift, 0), shared).view(-1).float()
        return (F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos))
                + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg)))
    if kind == "infonce":
        logits = F.normalize(specific.float(), dim=1) @ F.normalize(shared.float(), dim=1).T / temperature
        return F.cross_entropy(logits, torch.arange(len(specific), device=specific.device))
    raise ValueError(f"unknown contrastive kind {kind!r}")


class UniCDR(nn.Module):
    """The model; ``domains`` names the pair's domains in order, ``n_items`` their item counts."""

    def __init__(self, cfg: CDRModelConfig, n_users: int, domains: tuple[str, ...], n_items: tuple[int, ...]):
        super().__init__()
        if len(domains) != len(n_items) or len(domains) < 2:
            raise ValueError(f"need one item count per domain (two or more), got {domains} / {n_items}")
        self.cfg, self.domains, self.n_items, self.n_users = cfg, tuple(domains), tuple(n_items), n_users
        dim = cfg.dim
        self.item_emb = nn.ModuleDict({d: nn.Embedding(n + 1, dim, padding_idx=n) for d, n in zip(domains, n_items)})
        self.specific_user = nn.ModuleDict({d: nn.Embedding(n_users, dim) for d in domains})
        self.specific_agg = nn.ModuleDict({d: Aggregator(dim, cfg.aggregator, cfg.lambda_a, cfg.dropout)
                                           for d in domains})
        self.critic = nn.ModuleDict({d: BilinearCritic(dim) for d in domains}) \
            if cfg.contrastive == "bilinear" else None
        self.shared_user = nn.Embedding(n_users, dim)
        self.shared_agg = Aggregator(dim, cfg.aggregator, cfg.lambda_a, cfg.dropout)
        self.item_bias = nn.ParameterDict({d: nn.Parameter(torch.zeros(n)) for d, n in zip(domains, n_items)}) \
            if cfg.item_bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for emb in [*self.item_emb.values(), *self.specific_user.values(), self.shared_user]:
            nn.init.normal_(emb.weight, std=self.cfg.init_std)
            if emb.padding_idx is not None:
                with torch.no_grad():
                    emb.weight[emb.padding_idx].zero_()
        if self.item_bias is not None:
            for b in self.item_bias.values():
                nn.init.zeros_(b)

    @staticmethod
    def parameter_groups() -> dict[str, list[str]]:
        """FisherTune groups by parameter-name glob: what domains share vs what belongs to one domain."""
        return {"shared": ["shared_user.*", "shared_agg.*"],
                "specific": ["item_emb.*", "item_bias.*", "specific_user.*", "specific_agg.*", "critic.*"]}

    # -- representations ---------------------------------------------------------------------------

    def _embed(self, d: int, items: Tensor) -> tuple[Tensor, Tensor]:
        return self.item_emb[self.domains[d]](items), items != self.n_items[d]

    def user_parts(self, batch: CDRBatch) -> tuple[Tensor, Tensor]:
        """``(specific, shared)`` representations of the batch's users in its domain (dropout applied)."""
        dom = self.domains[batch.domain]
        ctx, valid = self._embed(batch.domain, batch.own)
        specific = self.specific_agg[dom](self.specific_user[dom](batch.users), ctx, valid, batch.own_w)
        parts = [self._embed(e, c) for e, c in enumerate(batch.shared)]
        g_ctx = torch.cat([p[0] for p in parts], 1)
        g_valid = torch.cat([p[1] for p in parts], 1)
        g_w = torch.cat(batch.shared_w, 1) if batch.shared_w is not None else None
        shared = self.shared_agg(self.shared_user(batch.users), g_ctx, g_valid, g_w)
        p = self.cfg.dropout
        return F.dropout(specific, p, self.training), F.dropout(shared, p, self.training)

    def user_repr(self, batch: CDRBatch) -> Tensor:
        """``specific + shared``; users with no history in the domain (``batch.cold``) keep only the shared part."""
        specific, shared = self.user_parts(batch)
        if batch.cold is not None:
            specific = specific * (~batch.cold).to(specific.dtype)[:, None]
        return specific + shared

    def item_repr(self, d: int, items: Tensor) -> Tensor:
        return F.dropout(self.item_emb[self.domains[d]](items), self.cfg.dropout, self.training)

    # -- training and scoring ----------------------------------------------------------------------

    def _bias(self, d: int, items: Tensor) -> Tensor | float:
        """The items' score offsets (0 without ``item_bias``)."""
        return 0.0 if self.item_bias is None else self.item_bias[self.domains[d]][items]

    def loss_terms(self, batch: CDRBatch, shift: int = 1) -> dict[str, Tensor]:
        """``{"loss", "rec", "contrastive"}`` for one domain batch; ``shift`` picks the critic's negatives."""
        specific, shared = self.user_parts(batch)
        user = specific + shared
        d = batch.domain
        pos = ((user * self.item_repr(d, batch.pos)).sum(-1) + self._bias(d, batch.pos)).float()
        neg = (torch.einsum("bd,bkd->bk", user, self.item_repr(d, batch.neg)) + self._bias(d, batch.neg)).float()
        rec = rec_loss(self.cfg.rec_loss, pos, neg)
        critic = self.critic[self.domains[batch.domain]] if self.critic is not None else None
        con = contrastive_loss(self.cfg.contrastive, specific, shared, critic, shift, self.cfg.temperature)
        w = self.cfg.contrastive_weight
        return {"loss": (1 - w) * rec + w * con, "rec": rec.detach(), "contrastive": con.detach()}

    def forward(self, batch: CDRBatch) -> Tensor:
        """Training loss of a batch (what FisherTune's ``batch_gradient_fisher`` differentiates)."""
        return self.loss_terms(batch)["loss"]

    def score_all(self, batch: CDRBatch) -> Tensor:
        """``B x n_items`` scores of every item of the batch's domain."""
        d = batch.domain
        table = self.item_emb[self.domains[d]].weight[: self.n_items[d]]
        scores = self.user_repr(batch) @ table.T
        return scores if self.item_bias is None else scores + self.item_bias[self.domains[d]]
