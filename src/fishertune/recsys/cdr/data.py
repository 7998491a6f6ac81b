"""Cross-domain scenarios for the UniCDR-style model: files -> per-domain matrices, validation, negatives.

A scenario is a task (``dual-user-intra`` / ``dual-user-inter``) and a domain pair (``sport_cloth``),
read from ``data_root()/cdr/<task>/<a>_<b>`` (and its sibling ``<b>_<a>``) with
:func:`~fishertune.recsys.data.read_cross_domain`, which gives one user index space for both domains.

- **dual-user-intra** (every user in both domains): test = ``test.txt`` of each domain, as UniCDR's
  ``train_rec.py`` reads it (not ``test_original.txt``). There is no validation file, so one training
  item per user and domain (users with at least two) is held out, seeded, for validation and model
  selection; a held-out item that would leave the training data altogether stays in training.
- **dual-user-inter** (cold-start, CDRIB): ``valid.txt`` / ``test.txt`` users have no training data in
  that domain; their history in the other domain is what the model has.

As in UniCDR, an evaluation item that has no training interaction in its domain is dropped (it cannot
be among the sampled candidates). Evaluation is per *instance* (one row per held-out user-item pair),
each instance ranking its item against ``n_negatives`` items drawn once, seeded, from the domain's
training items, excluding the user's training items and the item itself (UniCDR's draw); in
dual-user-intra every user has one instance per domain, so instance and user averages agree.

The processed scenario (matrices, held-out items and the negatives) is cached under
``cache_root()/cdr/<key>`` (key: the raw files' digests and every setting), built once under a lock.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from fishertune.config import ConfigError
from fishertune.recsys.data.cache import file_digest
from fishertune.recsys.data.readers import read_cross_domain
from fishertune.recsys.evaluate import sample_negatives
from fishertune.utils.io import atomic_dir, file_lock
from fishertune.utils.settings import cache_root, data_root

__all__ = [
    "STAGES",
    "TASKS",
    "CDRData",
    "DomainData",
    "available_pairs",
    "build_cdr",
    "eval_matrices",
    "hold_out_one",
    "load_cdr",
]

TASKS = ("dual-user-intra", "dual-user-inter")
STAGES = ("valid", "test", "select")  # "select": protocol original's second draw on the test instances
CACHE_VERSION = 1


@dataclass
class DomainData:
    """One domain of a pair: training matrix, evaluation instances and their negatives.

    ``train``: what the model trains on (validation items held out in dual-user-intra);
    ``train_full``: every training-file interaction (the history used at test time). Instances of a
    stage are parallel arrays ``users[s]``, ``items[s]``; ``negatives[s]`` is ``n_instances x N``.
    """

    name: str
    n_items: int
    train: sp.csr_matrix
    train_full: sp.csr_matrix
    users: dict[str, np.ndarray] = field(default_factory=dict)
    items: dict[str, np.ndarray] = field(default_factory=dict)
    negatives: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def train_items(self) -> np.ndarray:
        """The candidate pool: items with a training interaction (UniCDR's ``item_set``)."""
        return np.flatnonzero(np.diff(self.train_full.tocsc().indptr) > 0)

    def history(self, stage: str) -> sp.csr_matrix:
        """The user x item matrix the model sees when evaluated on ``stage``."""
        return self.train if stage == "valid" else self.train_full


@dataclass
class CDRData:
    """A scenario: both domains over one user index space."""

    task: str
    pair: str
    domains: tuple[str, str]
    n_users: int
    shared: np.ndarray  # bool per user: has an identity in both domains
    parts: dict[str, DomainData]
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, domain: str) -> DomainData:
        if domain not in self.parts:
            raise KeyError(f"unknown domain {domain!r}; this pair has {self.domains}")
        return self.parts[domain]

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.task, "pair": self.pair, "users": self.n_users,
                               "shared_users": int(self.shared.sum())}
        for dom in self.domains:
            p = self.parts[dom]
            out[dom] = {"items": p.n_items, "train": int(p.train.nnz), "train_full": int(p.train_full.nnz),
                        **{f"{s}_instances": len(p.users[s]) for s in p.users}}
        return out


# --------------------------------------------------------------------------------------- locating


def available_pairs(task: str, root: Path | None = None) -> list[str]:
    """Pairs ``a_b`` of a task folder whose sibling ``b_a`` exists (both directions listed)."""
    folder = (root or data_root()) / "cdr" / task
    if not folder.is_dir():
        return []
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.count("_") == 1)
    return [n for n in names if "_".join(reversed(n.split("_"))) in names]


def _pair_folder(task: str, pair: str) -> Path:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; available tasks: {', '.join(TASKS)}")
    root = data_root() / "cdr"
    pairs = available_pairs(task)
    if pair not in pairs:
        where = root / task
        listed = ", ".join(pairs) if pairs else f"none (no pair folders under {where})"
        raise ConfigError(f"unknown domain pair {pair!r} for task {task}; available pairs: {listed}")
    return root / task / pair


# ---------------------------------------------------------------------------------------- building


def _csr(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> sp.csr_matrix:
    m = sp.csr_matrix((np.ones(len(users), np.float32), (users, items)), shape=(n_users, n_items))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def hold_out_one(train: sp.csr_matrix, seed: int) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Hold out one training item per user with at least two, chosen uniformly (seeded).

    A held-out item whose every interaction was held out (so it would leave training, and could not be
    a candidate) is put back. Returns ``(remaining, users, items)``: the remaining matrix and the
    held-out pairs, disjoint from it, at most one per user.
    """
    train = train.tocsr()
    counts = np.diff(train.indptr)
    rows = np.repeat(np.arange(train.shape[0]), counts)
    cols = train.indices.astype(np.int64)
    keys = np.random.default_rng(seed).random(len(cols))
    order = np.lexsort((keys, rows))  # per user, entries by random key
    first = np.zeros(len(cols), bool)
    starts = train.indptr[:-1][counts >= 2]
    first[order[starts]] = True
    held = first.copy()
    remaining_deg = np.bincount(cols[~held], minlength=train.shape[1])
    held &= remaining_deg[cols] > 0  # never remove an item from training altogether
    keep = ~held
    remaining = sp.csr_matrix((np.ones(int(keep.sum()), np.float32), (rows[keep], cols[keep])),
                              shape=train.shape)
    v_users, v_items = rows[held], cols[held]
    order = np.argsort(v_users, kind="stable")
    return remaining, v_users[order], v_items[order]


def _in_pool(items: np.ndarray, pool: np.ndarray) -> np.ndarray:
    return np.isin(items, pool)


def build_cdr(task: str, pair: str, val_seed: int = 0, n_negatives: int = 999, negative_seed: int = 0,
              folder: Path | None = None) -> CDRData:
    """Read and process a scenario (no cache; :func:`load_cdr` caches this)."""
    folder = folder or _pair_folder(task, pair)
    raw = read_cross_domain(folder)
    n_users = raw.n_users
    has = [np.bincount(raw.get(d, "train").users, minlength=n_users) > 0 for d in raw.domains]
    both = has[0] & has[1]
    if not both.any():
        raise ConfigError(f"{folder}: the two domains share no user (no user has training data in both); "
                          "a cross-domain task needs overlapping users")
    if task == "dual-user-intra" and not both.all():
        raise ConfigError(f"{folder}: task dual-user-intra needs every user in both domains, but "
                          f"{int((~both).sum())} of {n_users} users have training data in one domain only; "
                          "use task dual-user-inter")
    parts: dict[str, DomainData] = {}
    dropped: dict[str, dict[str, int]] = {}
    for k, dom in enumerate(raw.domains):
        n_items = len(raw.item_ids[dom])
        tr = raw.get(dom, "train")
        full = _csr(tr.users, tr.items, n_users, n_items)
        if task == "dual-user-intra":
            train, vu, vi = hold_out_one(full, val_seed + 7919 * k)
            test = raw.get(dom, "test")
            tu, ti = test.users, test.items
        else:
            if "valid" not in raw.parts[dom]:
                raise ConfigError(f"{folder}: task {task} needs valid.txt in domain {dom}")
            train = full
            v, t = raw.get(dom, "valid"), raw.get(dom, "test")
            vu, vi, tu, ti = v.users, v.items, t.users, t.items
        part = DomainData(dom, n_items, train.tocsr(), full)
        pool = part.train_items
        dropped[dom] = {}
        for stage, (u, i) in (("valid", (vu, vi)), ("test", (tu, ti))):
            ok = _in_pool(i, pool)
            dropped[dom][stage] = int((~ok).sum())
            part.users[stage], part.items[stage] = u[ok].astype(np.int64), i[ok].astype(np.int64)
            if len(part.users[stage]) == 0:
                raise ConfigError(f"{folder}: domain {dom} has no {stage} instance whose item is a training item")
        if task == "dual-user-inter":  # cold start: a test user must have no training data here
            for stage in ("valid", "test"):
                warm = np.diff(full.indptr)[part.users[stage]] > 0
                if warm.any():
                    raise ConfigError(f"{folder}: {stage} user {part.users[stage][warm][0]} of {dom} has training "
                                      "data in that domain; dual-user-inter expects cold-start users")
        _draw_negatives(part, n_negatives, negative_seed, pool)
        parts[dom] = part
    meta = {"task": task, "pair": pair, "val_seed": val_seed, "n_negatives": n_negatives,
            "negative_seed": negative_seed, "dropped_eval_items_not_in_train": dropped,
            "test_file": "test.txt", "cache_version": CACHE_VERSION}
    return CDRData(task, pair, raw.domains, n_users, raw.shared.copy(), parts, meta)


def _draw_negatives(part: DomainData, n: int, seed: int, pool: np.ndarray) -> None:
    """Negatives per instance: ``valid`` seed+1, ``test`` seed, ``select`` (protocol original) seed+2."""
    for stage, s, src in (("test", seed, "test"), ("valid", seed + 1, "valid"), ("select", seed + 2, "test")):
        inp, tgt = eval_matrices(part, src)
        part.negatives[stage] = sample_negatives(inp, tgt, np.arange(inp.shape[0]), n, seed=s, candidates=pool)


def eval_matrices(part: DomainData, stage: str) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Instance-level ``(input, target)``: row r = instance r's user's history and its one item."""
    src = "test" if stage == "select" else stage
    users, items = part.users[src], part.items[src]
    hist = part.history(src)[users]
    tgt = _csr(np.arange(len(users)), items, len(users), part.n_items)
    return hist.tocsr(), tgt


# ------------------------------------------------------------------------------------------ caching


def _key(folder: Path, task: str, pair: str, val_seed: int, n_negatives: int, negative_seed: int) -> str:
    a, b = pair.split("_")
    files = sorted(p for d in (folder, folder.parent / f"{b}_{a}") for p in d.glob("*.txt")
                   if p.stem in ("train", "valid", "test", "test_original"))
    digests = [[f"{p.parent.name}/{p.name}", file_digest(p)] for p in files]
    blob = json.dumps({"v": CACHE_VERSION, "files": digests, "task": task, "pair": pair, "val_seed": val_seed,
                       "n_negatives": n_negatives, "negative_seed": negative_seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save(data: CDRData, out: Path) -> None:
    arrays: dict[str, np.ndarray] = {"shared": data.shared}
    for dom, p in data.parts.items():
        for name, m in (("train", p.train), ("train_full", p.train_full)):
            sp.save_npz(out / f"{dom}.{name}.npz", m, compressed=False)
        for s in p.users:
            arrays[f"{dom}.users.{s}"], arrays[f"{dom}.items.{s}"] = p.users[s], p.items[s]
        for s in p.negatives:
            arrays[f"{dom}.negatives.{s}"] = p.negatives[s]
    np.savez(out / "arrays.npz", **arrays)
    meta = {**data.meta, "domains": list(data.domains), "n_users": data.n_users,
            "n_items": {d: p.n_items for d, p in data.parts.items()}}
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


def _load(folder: Path) -> CDRData:
    meta = json.loads((folder / "meta.json").read_text())
    arrays = np.load(folder / "arrays.npz")
    parts = {}
    for dom in meta["domains"]:
        p = DomainData(dom, int(meta["n_items"][dom]), sp.load_npz(folder / f"{dom}.train.npz").tocsr(),
                       sp.load_npz(folder / f"{dom}.train_full.npz").tocsr())
        for key in arrays.files:
            d, kind, *rest = key.split(".") + [""]
            if d == dom and kind in ("users", "items", "negatives"):
                getattr(p, kind)[rest[0]] = arrays[key]
        parts[dom] = p
    return CDRData(meta["task"], meta["pair"], tuple(meta["domains"]), int(meta["n_users"]),
                   arrays["shared"].astype(bool), parts, meta)


def load_cdr(task: str, pair: str, val_seed: int = 0, n_negatives: int = 999, negative_seed: int = 0,
             use_cache: bool = True) -> tuple[CDRData, str]:
    """The processed scenario and its data hash, read from the cache or built once (under a lock)."""
    folder = _pair_folder(task, pair)
    key = _key(folder, task, pair, val_seed, n_negatives, negative_seed)
    entry = cache_root() / "cdr" / key
    if use_cache and (entry / "meta.json").is_file():
        return _load(entry), key
    with file_lock(entry):
        if use_cache and (entry / "meta.json").is_file():
            return _load(entry), key
        data = build_cdr(task, pair, val_seed, n_negatives, negative_seed, folder)
        data.meta["data_hash"] = key
        if use_cache:
            with atomic_dir(entry) as tmp:
                _save(data, tmp)
    return data, key
