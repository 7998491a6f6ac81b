"""Processed-data cache: config -> (Split, data hash), computed once and reused.

The key hashes the sha256 of every raw file the dataset reads (digests are remembered by
``(path, size, mtime)`` so they are not recomputed each time) and every preprocessing and split
setting. A cache entry is a folder of ``.npz`` matrices, ``.npy`` ID maps and ``meta.json``, built
under a temporary name and renamed into place (``atomic_dir``) while holding a file lock, so two
processes preparing the same entry at once never see or leave a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from fishertune.recsys.data.config import DataConfig
from fishertune.recsys.data.preprocess import filter_interactions
from fishertune.recsys.data.readers import deduplicate, read_sequences, read_table
from fishertune.recsys.data.registry import ensure_dataset, get_dataset, load_cross_domain
from fishertune.recsys.data.splits import make_split
from fishertune.recsys.data.types import IdMap, Interactions, Split
from fishertune.utils.io import atomic_dir, atomic_write_json, file_lock
from fishertune.utils.progress import track
from fishertune.utils.settings import cache_root, data_root

CACHE_VERSION = 1  # bump when reading, preprocessing or splitting changes what a config produces
MATRICES = ("train", "valid_input", "valid_target", "test_input", "test_target")


# ---------------------------------------------------------------------------------------------------
# raw-file digests


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, remembered in the cache by (path, size, mtime) until the file changes."""
    path = Path(path).resolve()
    st = path.stat()
    store = cache_root() / "digests.json"
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    known = _read_json(store)
    hit = known.get(str(path))
    if hit and all(hit.get(k) == v for k, v in stamp.items()):
        return hit["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with file_lock(store):
        known = _read_json(store)
        known[str(path)] = {**stamp, "sha256": digest}
        atomic_write_json(store, known)
    return digest


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


# ---------------------------------------------------------------------------------------------------
# reading and preprocessing a config's data


def _explicit_path(cfg: DataConfig) -> Path:
    path = Path(cfg.path).expanduser()  # type: ignore[arg-type]
    if not path.is_absolute() and not path.exists():
        path = data_root() / path
    if not path.is_file():
        raise FileNotFoundError(f"data.path: file not found: {cfg.path}")
    return path


def data_files(cfg: DataConfig) -> list[Path]:
    """The raw files a config reads (downloading a registered dataset first when missing)."""
    if cfg.path is not None:
        return [_explicit_path(cfg)]
    return ensure_dataset(get_dataset(cfg.name))


def read_raw(cfg: DataConfig) -> Interactions:
    """The config's data as read, duplicates kept (``deduplicate`` applies the policy)."""
    if cfg.path is not None:
        path = _explicit_path(cfg)
        if cfg.format == "sequence":
            return read_sequences(path, name=cfg.name, duplicates="keep_all")
        c = cfg.columns
        return read_table(path, user=c.user, item=c.item, rating=c.rating, timestamp=c.timestamp,
                          format=cfg.format, sep=cfg.sep, name=cfg.name, duplicates="keep_all")
    spec = get_dataset(cfg.name)
    return spec.loader(ensure_dataset(spec), "keep_all")


def load_interactions(cfg: DataConfig) -> tuple[Interactions, dict[str, Any]]:
    """Read, deduplicate (policy ``cfg.duplicates``) and filter; return the log and a report."""
    inter, n_dup = deduplicate(read_raw(cfg), cfg.duplicates)
    inter, report = filter_interactions(inter, cfg.min_rating, cfg.min_user_interactions,
                                        cfg.min_item_interactions, cfg.k_core)
    return inter, {"duplicates_dropped": n_dup, "duplicate_policy": cfg.duplicates, **report}


def split_interactions(inter: Interactions, cfg: DataConfig) -> Split:
    s = cfg.split
    return make_split(inter, s.protocol, valid_ratio=s.valid_ratio, test_ratio=s.test_ratio,
                      temporal_mode=s.temporal_mode, n_valid_users=s.n_valid_users, n_test_users=s.n_test_users,
                      target_fraction=s.target_fraction, seed=s.seed)


# ---------------------------------------------------------------------------------------------------
# the cache


def config_hash(cfg: DataConfig, files: list[Path] | None = None) -> str:
    """The data hash: raw-file digests + every setting (not ``path``, which the digests cover)."""
    files = data_files(cfg) if files is None else files
    digests = [[p.name, file_digest(p)] for p in track(files, "hashing data files")]
    settings = cfg.model_dump(mode="json", exclude={"path"})
    blob = json.dumps({"version": CACHE_VERSION, "files": digests, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save(split: Split, folder: Path) -> None:
    for name in MATRICES:
        sp.save_npz(folder / f"{name}.npz", getattr(split, name).tocsr(), compressed=False)
    for name, idmap in (("user_ids", split.user_ids), ("item_ids", split.item_ids)):
        ids = idmap.ids if idmap.ids.dtype != object else idmap.ids.astype(str)
        np.save(folder / f"{name}.npy", ids, allow_pickle=False)
    (folder / "meta.json").write_text(json.dumps(split.meta, indent=2, sort_keys=True, default=_jsonable))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def _load(folder: Path) -> Split:
    mats = {}
    for name in MATRICES:
        m = sp.load_npz(folder / f"{name}.npz").tocsr()
        mats[name] = m if m.dtype == np.float32 else m.astype(np.float32)
    ids = {n: IdMap(np.load(folder / f"{n}.npy", allow_pickle=False)) for n in ("user_ids", "item_ids")}
    meta = json.loads((folder / "meta.json").read_text())
    return Split(**mats, **ids, meta=meta)


def entry_dir(key: str) -> Path:
    return cache_root() / "splits" / key


def load_split(cfg: DataConfig, use_cache: bool = True) -> tuple[Split, str]:
    """The split a config describes, and its data hash; built once, then read from the cache.

    ``Split.meta`` records the protocol, its settings, the data hash, the dataset, the raw files'
    digests, the preprocessing report and the whole resolved data config.
    """
    files = data_files(cfg)
    key = config_hash(cfg, files)
    folder = entry_dir(key)
    if use_cache and (folder / "meta.json").is_file():
        return _load(folder), key
    with file_lock(folder):
        if use_cache and (folder / "meta.json").is_file():  # another process built it meanwhile
            return _load(folder), key
        inter, report = load_interactions(cfg)
        split = split_interactions(inter, cfg)
        split.meta.update(data_hash=key, dataset=cfg.name, preprocess=report, config=cfg.model_dump(mode="json"),
                          files={p.name: file_digest(p) for p in files}, cache_version=CACHE_VERSION)
        if use_cache:
            if folder.exists():  # an entry without meta.json is not one of ours: replace it
                shutil.rmtree(folder)
            with atomic_dir(folder) as tmp:
                _save(split, tmp)
    return split, key


def clean_cache() -> int:
    """Remove the processed-data cache (``cache_root()``); return the bytes freed."""
    root = cache_root().resolve()
    if root in (Path("/"), Path.home().resolve()) or not root.exists():
        if root.exists():
            raise ValueError(f"refusing to remove {root}: FISHERTUNE_CACHE points at a top-level folder")
        return 0
    freed = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    shutil.rmtree(root)
    return freed


def dataset_stats(name_or_cfg: str | DataConfig) -> dict[str, float]:
    """Users / items / interactions / density of a dataset (a name: as read, duplicates merged; a
    config: after its preprocessing). A cross-domain name gives both domains' figures."""
    if isinstance(name_or_cfg, DataConfig):
        inter, _ = load_interactions(name_or_cfg)
        return inter.stats()
    if name_or_cfg.startswith("cdr/"):
        return load_cross_domain(name_or_cfg).stats()
    return load_interactions(DataConfig(name=name_or_cfg))[0].stats()
