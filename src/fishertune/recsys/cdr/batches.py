"""Device-resident histories and batches for the cross-domain model: no per-user Python loops.

Every user's history in each domain is a row of a padded index matrix on the device (pad = the
domain's ``n_items``, an all-zero embedding row). A batch's contexts are drawn from those rows with
random keys and one ``topk``: a uniform sample without replacement of ``n_keep`` items per row.

Interaction masking (UniCDR's augmentation): a training context keeps
``n_keep = min(max_len, max(1, floor(n * (1 - mask_rate))))`` of the user's ``n`` candidate items
(``0`` when ``n = 0``); the candidates exclude the target item, so the model never sees what it
predicts. Evaluation contexts keep ``min(eval_max_len, n)`` items (no masking).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

__all__ = ["CDRBatch", "Histories", "TrainSampler", "item_similarity_scores", "keep_counts"]


@dataclass
class CDRBatch:
    """One domain's batch. Context item indices are per domain, padded with that domain's ``n_items``.

    ``own``: the user's context in ``domain`` (for the domain-specific representation); ``shared``: one
    context per domain of the pair (for the domain-shared representation); ``*_w``: per-item scores
    for the item-similarity aggregator (``None`` otherwise). ``pos``/``neg`` only in training batches.
    ``cold``: users with no history in ``domain`` (their domain-specific part is left out).
    """

    domain: int
    users: Tensor
    own: Tensor
    shared: tuple[Tensor, ...]
    pos: Tensor | None = None
    neg: Tensor | None = None
    own_w: Tensor | None = None
    shared_w: tuple[Tensor, ...] | None = None
    cold: Tensor | None = None

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def replace(self, **changes) -> CDRBatch:
        return replace(self, **changes)


def keep_counts(n_cand: Tensor, max_len: int, mask_rate: float) -> Tensor:
    """How many context items a row keeps: see the module docstring."""
    if mask_rate <= 0:
        return n_cand.clamp(max=max_len)
    keep = torch.floor(n_cand.to(torch.float64) * (1.0 - mask_rate)).to(n_cand.dtype).clamp(min=1)
    return torch.where(n_cand > 0, keep.clamp(max=max_len), torch.zeros_like(n_cand))


def item_similarity_scores(train: sp.csr_matrix, block: int = 4096) -> sp.csr_matrix:
    """Per interaction (u, i): ``sum_{j in hist(u), j != i} cos(i, j)`` (item co-occurrence cosine).

    The scores the item-similarity aggregator softmaxes over (UniCDR uses EASE scores; a dense EASE
    inverse of 30k-40k items takes 7-12 GB, this sparse ItemKNN score is its cheap stand-in).
    """
    x = train.tocsr().astype(np.float32)
    x.data[:] = 1.0
    deg = np.asarray(x.sum(0)).ravel()
    inv = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1)), 0.0).astype(np.float32)
    xn = x @ sp.diags(inv)
    sim = (xn.T @ xn).tocsr()  # cosine between items
    sim.setdiag(0)
    sim.eliminate_zeros()
    out = x.copy()
    # x is binary and sim's diagonal is zero, so the score of (u, i) is (x @ sim)[u, i]; read it at x's
    # entries, a block of users at a time so that x @ sim stays small
    for a in range(0, x.shape[0], block):
        xb = x[a:a + block]
        rows = np.repeat(np.arange(xb.shape[0]), np.diff(xb.indptr))
        lo, hi = x.indptr[a], x.indptr[min(a + block, x.shape[0])]
        out.data[lo:hi] = np.asarray((xb @ sim).tocsr()[rows, xb.indices]).ravel()
    return out


class Histories:
    """Padded per-domain histories on ``device``: ``items[d]`` (n_users x L_d), ``lens[d]``, ``w[d]``."""

    def __init__(self, mats: list[sp.csr_matrix], device: torch.device, weights: list[sp.csr_matrix] | None = None):
        self.device = device
        self.n_items = [m.shape[1] for m in mats]
        self.items: list[Tensor] = []
        self.lens: list[Tensor] = []
        self.w: list[Tensor | None] = []
        for d, m in enumerate(mats):
            m = m.tocsr()
            m.sort_indices()
            lens = np.diff(m.indptr)
            width = max(1, int(lens.max()) if len(lens) else 1)
            rows = np.repeat(np.arange(m.shape[0]), lens)
            cols = np.arange(m.nnz) - np.repeat(m.indptr[:-1], lens)
            pad = np.full((m.shape[0], width), m.shape[1], dtype=np.int64)
            pad[rows, cols] = m.indices
            self.items.append(torch.from_numpy(pad).to(device))
            self.lens.append(torch.from_numpy(lens.astype(np.int64)).to(device))
            if weights is not None:
                wm = weights[d].tocsr()
                wm.sort_indices()
                wp = np.zeros((m.shape[0], width), dtype=np.float32)
                wp[rows, cols] = wm.data
                self.w.append(torch.from_numpy(wp).to(device))
            else:
                self.w.append(None)

    def sample(self, d: int, users: Tensor, max_len: int, mask_rate: float = 0.0, exclude: Tensor | None = None,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """A context of at most ``max_len`` items per user of domain ``d`` (padded), and its scores."""
        h = self.items[d][users]
        width = h.shape[1]
        valid = torch.arange(width, device=h.device)[None, :] < self.lens[d][users][:, None]
        if exclude is not None:
            valid &= h != exclude[:, None]
        n_keep = keep_counts(valid.sum(1), max_len, mask_rate)
        keys = torch.rand(h.shape, device=h.device, generator=generator)
        keys = torch.where(valid, keys, torch.full_like(keys, 2.0))
        k = min(max_len, width)
        idx = keys.topk(k, dim=1, largest=False, sorted=True).indices
        sel = h.gather(1, idx)
        keep = torch.arange(k, device=h.device)[None, :] < n_keep[:, None]
        pad = self.n_items[d]
        sel = torch.where(keep, sel, torch.full_like(sel, pad))
        w = None
        if self.w[d] is not None:
            w = self.w[d][users].gather(1, idx)
            w = torch.where(keep, w, torch.zeros_like(w))
        if k < max_len:
            sel = torch.cat([sel, sel.new_full((len(users), max_len - k), pad)], 1)
            if w is not None:
                w = torch.cat([w, w.new_zeros((len(users), max_len - k))], 1)
        return sel, w

    def empty(self, d: int, n: int, width: int) -> tuple[Tensor, Tensor | None]:
        sel = torch.full((n, width), self.n_items[d], dtype=torch.long, device=self.device)
        return sel, (None if self.w[d] is None else torch.zeros(n, width, device=self.device))


class TrainSampler:
    """Training batches: each step gives one batch per domain (UniCDR sums the two domains' losses).

    An epoch is one pass over the larger domain's training interactions (the smaller one wraps
    around), shuffled by ``generator``. Each interaction (u, i) brings ``n_neg`` negatives drawn
    uniformly from the domain's training items, none a training item of u (resampled until clear, at
    most 10 rounds), the masked context of u without i, and the shared contexts: in dual-user-intra
    the other domain's masked history and no own-domain items (UniCDR's domain mask), in
    dual-user-inter the other domain's whole history (up to ``max_len``) for shared users only.
    """

    def __init__(self, hist: Histories, mats: list[sp.csr_matrix], shared_users: np.ndarray, task: str,
                 batch_size: int, max_len: int, mask_rate: float, n_neg: int):
        dev = hist.device
        self.hist, self.task, self.bs, self.max_len, self.mask_rate, self.n_neg = (
            hist, task, batch_size, max_len, mask_rate, n_neg)
        self.users, self.items, self.keys, self.pool = [], [], [], []
        for m in mats:
            coo = m.tocoo()
            u, i = coo.row.astype(np.int64), coo.col.astype(np.int64)
            self.users.append(torch.from_numpy(u).to(dev))
            self.items.append(torch.from_numpy(i).to(dev))
            self.keys.append(torch.from_numpy(np.sort(u * m.shape[1] + i)).to(dev))
            self.pool.append(torch.from_numpy(np.flatnonzero(np.diff(m.tocsc().indptr) > 0)).to(dev))
        self.shared_users = torch.from_numpy(np.asarray(shared_users, bool)).to(dev)
        self.n = [len(u) for u in self.users]
        self.steps = max(1, -(-max(self.n) // batch_size))

    def __len__(self) -> int:
        return self.steps

    def _negatives(self, d: int, users: Tensor, gen: torch.Generator | None) -> Tensor:
        pool, n_items = self.pool[d], self.hist.n_items[d]
        neg = pool[torch.randint(len(pool), (len(users), self.n_neg), device=users.device, generator=gen)]
        for _ in range(10):
            key = users[:, None] * n_items + neg
            pos = torch.searchsorted(self.keys[d], key).clamp(max=len(self.keys[d]) - 1)
            clash = self.keys[d][pos] == key
            if not bool(clash.any()):
                break
            fresh = pool[torch.randint(len(pool), neg.shape, device=users.device, generator=gen)]
            neg = torch.where(clash, fresh, neg)
        return neg

    def batch(self, d: int, idx: Tensor, gen: torch.Generator | None) -> CDRBatch:
        users, pos = self.users[d][idx], self.items[d][idx]
        own, own_w = self.hist.sample(d, users, self.max_len, self.mask_rate, exclude=pos, generator=gen)
        shared, shared_w = [], []
        for e in range(len(self.hist.items)):
            if e == d:  # domain mask: the shared part learns from the other domain only
                c, w = self.hist.empty(e, len(users), self.max_len)
            elif self.task == "dual-user-inter":
                c, w = self.hist.sample(e, users, self.max_len, 0.0, generator=gen)
                pad = torch.full_like(c, self.hist.n_items[e])
                c = torch.where(self.shared_users[users][:, None], c, pad)
            else:
                c, w = self.hist.sample(e, users, self.max_len, self.mask_rate, generator=gen)
            shared.append(c)
            shared_w.append(w)
        neg = self._negatives(d, users, gen)
        sw = tuple(shared_w) if shared_w[0] is not None else None
        return CDRBatch(d, users, own, tuple(shared), pos, neg, own_w, sw)

    def epoch(self, gen: torch.Generator | None) -> Iterator[list[CDRBatch]]:
        """``len(self)`` steps, each a list with one batch per domain."""
        dev = self.hist.device
        perms = [torch.randperm(n, device=dev, generator=gen) for n in self.n]
        n_max = max(self.n)
        for step in range(self.steps):
            at = torch.arange(step * self.bs, min((step + 1) * self.bs, n_max), device=dev)
            yield [self.batch(d, perms[d][at % n], gen) for d, n in enumerate(self.n)]


def eval_batch(hist: Histories, d: int, users: Tensor, task: str, max_len: int,
               gen: torch.Generator | None, shared_own: bool = True) -> CDRBatch:
    """The evaluation context of ``users`` in domain ``d``: up to ``max_len`` items of each domain's
    history, no masking; in dual-user-inter the own domain is empty (cold start). ``shared_own=False``
    leaves domain ``d`` out of the shared context, as in training (UniCDR keeps it: True)."""
    cold = hist.lens[d][users] == 0
    if task == "dual-user-inter":
        own, own_w = hist.empty(d, len(users), max_len)
    else:
        own, own_w = hist.sample(d, users, max_len, 0.0, generator=gen)
    shared, shared_w = [], []
    for e in range(len(hist.items)):
        if e == d and (task == "dual-user-inter" or not shared_own):
            c, w = hist.empty(e, len(users), max_len)
        else:
            c, w = hist.sample(e, users, max_len, 0.0, generator=gen)
        shared.append(c)
        shared_w.append(w)
    sw = tuple(shared_w) if shared_w[0] is not None else None
    return CDRBatch(d, users, own, tuple(shared), own_w=own_w, shared_w=sw, cold=cold)
