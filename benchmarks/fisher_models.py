"""Models and data for benchmarks/fisher.py: an MLP, a Mult-VAE, a SASRec-sized transformer, a CNN.

Every builder is seeded, so separate worker processes build identical models and batches.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F


@dataclass
class Case:
    name: str
    model: nn.Module
    batches: list[tuple[tuple[Tensor, ...], Tensor]]
    likelihood: str
    nll: Callable[[Tensor, Tensor], Tensor]  # per-sample NLL [B], for the reference paths
    sequential: bool  # an nn.Sequential of standard layers (BackPACK's scope)
    float_input: bool  # nngeometry needs a float input that can require grad
    note: str = ""


def ce_nll(out: Tensor, y: Tensor) -> Tensor:
    if out.dim() == 3:
        return F.cross_entropy(out.transpose(1, 2), y, reduction="none").sum(1)
    return F.cross_entropy(out, y, reduction="none")


def multinomial_nll(out: Tensor, x: Tensor) -> Tensor:
    return -(torch.log_softmax(out, -1) * x).sum(-1)


class L2Normalize(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1)


class TakeMu(nn.Module):
    """Mult-VAE at evaluation: z = mu, the first half of the encoder's output."""

    def __init__(self, latent: int):
        super().__init__()
        self.latent = latent

    def forward(self, h: Tensor) -> Tensor:
        return h[..., :self.latent]


def mult_vae(n_items: int, hidden: int = 600, latent: int = 200) -> nn.Sequential:
    """Mult-VAE (Liang et al. 2018) in eval mode: encoder q(z|x) -> (mu, logvar), z = mu, decoder."""
    return nn.Sequential(L2Normalize(), nn.Linear(n_items, hidden), nn.Tanh(), nn.Linear(hidden, 2 * latent),
                         TakeMu(latent), nn.Linear(latent, hidden), nn.Tanh(), nn.Linear(hidden, n_items))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.ff1, self.ff2 = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, h: Tensor, causal: Tensor) -> Tensor:
        q = self.norm1(h)
        a, _ = self.attn(q, h, h, attn_mask=causal, need_weights=False)
        h = q + a
        return h + self.ff2(torch.relu(self.ff1(self.norm2(h))))


class SASRec(nn.Module):
    """SASRec (Kang & McAuley 2018): item + position embeddings, causal self-attention blocks, and a
    full softmax over items at every position (an untied output layer)."""

    def __init__(self, n_items: int, d: int = 64, blocks: int = 2, heads: int = 2, max_len: int = 50):
        super().__init__()
        self.d = d
        self.item_emb = nn.Embedding(n_items, d, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList([Block(d, heads) for _ in range(blocks)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_items)

    def forward(self, seq: Tensor) -> Tensor:
        B, L = seq.shape
        pos = torch.arange(L, device=seq.device).expand(B, L)
        h = self.item_emb(seq) * math.sqrt(self.d) + self.pos_emb(pos)
        h = h * (seq != 0).unsqueeze(-1)
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool, device=seq.device), 1)
        for blk in self.blocks:
            h = blk(h, causal)
        return self.head(self.norm(h))


def cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


def _ml1m_rows(n_rows: int, n_items: int) -> Tensor | None:
    """Binary user x item rows of real ML-1M (every rating counts; through the data layer), the first
    ``n_rows`` users, repeated when more rows are asked than ML-1M has; None without the data."""
    root = os.environ.get("FISHERTUNE_DATA")
    if not root or not any((Path(root) / "ml-1m" / n).is_file() for n in ("ratings.dat.gz", "ratings.dat")):
        return None
    from common import ml1m_binary

    mat = ml1m_binary(min_rating=0)
    if mat.shape[1] != n_items:
        return None
    x = torch.from_numpy(mat[:n_rows].toarray())
    if len(x) < n_rows:  # GPU batches ask for more rows than ML-1M's 6,040 users: repeat them
        x = x.repeat(-(-n_rows // len(x)), 1)[:n_rows]
    return x


def build(name: str, quick: bool, device: str, batch: int | None = None) -> Case:
    """The benchmark case ``name``; ``batch`` overrides the samples per batch (same number of batches)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    gpu = device.startswith("cuda") and not quick
    if name == "mlp":
        B, nb = (64, 2) if quick else (4096, 8) if gpu else (128, 4)
        B = batch or B
        model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
        batches = [((torch.randn(B, 784, generator=g),), torch.randint(0, 10, (B,), generator=g)) for _ in range(nb)]
        case = Case("(a) MLP 784-1024-1024-10", model, batches, "categorical", ce_nll, True, True)
    elif name == "vae":
        B, nb, V = (64, 2, 3706) if quick else (2048, 8, 3706) if gpu else (128, 4, 3706)
        B = batch or B
        model = mult_vae(V)
        x = _ml1m_rows(B * nb, V)
        note = "real ML-1M user rows"
        if x is None:
            x = (torch.rand(B * nb, V, generator=g) < 0.045).float()
            x[:, 0] = 1.0
            note = "random ML-1M-sized binary rows (density 4.5%)"
        batches = [((x[i * B:(i + 1) * B],), x[i * B:(i + 1) * B]) for i in range(nb)]
        case = Case(f"(b) Mult-VAE {V}-600-200-600-{V}", model, batches, "multinomial", multinomial_nll, True, True, note)
    elif name == "sasrec":
        B, nb, V = (16, 2, 5000) if quick else (256, 4, 50000) if gpu else (32, 2, 20000)
        B = batch or B
        L = 50
        model = SASRec(V, max_len=L)
        batches = []
        for _ in range(nb):
            seq = torch.randint(1, V, (B, L + 1), generator=g)
            seq[: B // 4, : L // 3] = 0  # some left padding
            y = seq[:, 1:].clone()
            y[seq[:, :-1] == 0] = -100
            batches.append(((seq[:, :-1],), y))
        case = Case(f"(c) SASRec items={V} d=64 2 blocks 2 heads L={L}", model, batches, "categorical",
                    lambda out, y: F.cross_entropy(out.transpose(1, 2), y, reduction="none", ignore_index=-100).sum(1),
                    False, False, "full softmax over items at every position; per-sequence Fisher")
    elif name == "cnn":
        B, nb = (64, 2) if quick else (2048, 8) if gpu else (128, 4)
        B = batch or B
        model = cnn()
        batches = [((torch.randn(B, 1, 28, 28, generator=g),), torch.randint(0, 10, (B,), generator=g))
                   for _ in range(nb)]
        case = Case("(d) CNN conv16-conv32-fc128-10 (28x28)", model, batches, "categorical", ce_nll, True, True)
    else:
        raise ValueError(f"unknown model {name!r}")
    case.model = case.model.to(device).eval()
    case.batches = [(tuple(t.to(device) for t in x), y.to(device)) for x, y in case.batches]
    return case
