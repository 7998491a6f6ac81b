"""Processed-data cache: keys, reuse, digest memo, two concurrent processes, cleaning, stats."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pytest

import fishertune.recsys.data.cache as cache_mod
from fishertune.recsys.data import DataConfig, clean_cache, config_hash, dataset_stats, file_digest, load_split
from fishertune.recsys.data.preprocess import EmptyDataError

MATS = ("train", "valid_input", "valid_target", "test_input", "test_target")


@pytest.fixture
def env(tmp_path, monkeypatch):
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    monkeypatch.setenv("FISHERTUNE_DATA", str(data))
    monkeypatch.setenv("FISHERTUNE_CACHE", str(cache))
    rng = np.random.default_rng(0)
    lines = ["user,item,rating,timestamp"]
    for u in range(30):
        for i in rng.choice(40, size=rng.integers(3, 15), replace=False):
            lines.append(f"u{u},{i},{rng.integers(1, 6)},{rng.integers(0, 10_000)}")
    (data / "log.csv").write_text("\n".join(lines) + "\n")
    return data, cache


def cfg_for(**kw) -> DataConfig:
    return DataConfig(name="toy", path="log.csv", **kw)  # relative paths resolve under FISHERTUNE_DATA


def same(a, b) -> bool:
    return all((getattr(a, m) != getattr(b, m)).nnz == 0 for m in MATS) and \
        np.array_equal(a.user_ids.ids, b.user_ids.ids) and np.array_equal(a.item_ids.ids, b.item_ids.ids)


def test_cache_roundtrip_and_meta(env):
    data, cache = env
    cfg = cfg_for(min_rating=2, split={"protocol": "holdout", "seed": 3})
    split, key = load_split(cfg)
    entries = list((cache / "splits").iterdir())
    assert [p.name for p in entries if not p.name.endswith(".lock")] == [key]
    assert sorted(p.name for p in (cache / "splits" / key).iterdir()) == sorted(
        [f"{m}.npz" for m in MATS] + ["user_ids.npy", "item_ids.npy", "meta.json"])
    again, key2 = load_split(cfg)
    assert key2 == key and same(split, again)
    fresh, _ = load_split(cfg, use_cache=False)
    assert same(split, fresh)
    meta = again.meta
    assert meta["protocol"] == "holdout" and meta["settings"]["seed"] == 3 and meta["data_hash"] == key
    assert meta["config"]["min_rating"] == 2 and meta["files"]["log.csv"] == file_digest(data / "log.csv")
    assert split.user_ids.ids.dtype.kind == "U" and split.user_ids.ids[0] == "u0"


def test_key_depends_on_settings_and_content(env):
    data, _ = env
    base = config_hash(cfg_for())
    assert config_hash(cfg_for()) == base
    assert config_hash(cfg_for(min_user_interactions=3)) != base
    assert config_hash(cfg_for(split={"seed": 1})) != base
    assert config_hash(DataConfig(name="toy", path=str(data / "log.csv"))) == base  # path not in the key
    f = data / "log.csv"
    text = f.read_text()
    f.write_text(text.replace("u0,", "u9,", 1))  # same size, new content and mtime
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert config_hash(cfg_for()) != base


def test_digest_memo_by_size_and_mtime(env, monkeypatch):
    data, cache = env
    f = data / "log.csv"
    first = file_digest(f)
    memo = json.loads((cache / "digests.json").read_text())
    assert memo[str(f.resolve())]["sha256"] == first
    opened = []
    real_open = open

    def spy(path, *a, **k):
        opened.append(str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", spy)
    assert file_digest(f) == first and str(f.resolve()) not in opened  # memo hit: file not read
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert file_digest(f) == first and str(f.resolve()) in opened  # mtime changed: re-read


def _worker(cfg_json: str, barrier, out: str) -> None:
    barrier.wait()
    split, key = load_split(DataConfig.model_validate_json(cfg_json))
    Path(out).write_text(json.dumps({"key": key, "nnz": [getattr(split, m).nnz for m in MATS]}))


def test_two_processes_build_one_entry(env, tmp_path, monkeypatch):
    _, cache = env
    counter = tmp_path / "builds.txt"
    real = cache_mod.split_interactions

    def slow_split(inter, cfg):  # widen the race window and count the builds
        with open(counter, "a") as fh:
            fh.write("build\n")
        time.sleep(0.3)
        return real(inter, cfg)

    monkeypatch.setattr(cache_mod, "split_interactions", slow_split)
    cfg = cfg_for(split={"protocol": "leave_one_out"})
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(2)
    outs = [tmp_path / f"out{k}.json" for k in range(2)]
    procs = [ctx.Process(target=_worker, args=(cfg.model_dump_json(), barrier, str(o))) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    results = [json.loads(o.read_text()) for o in outs]
    assert results[0] == results[1]
    assert counter.read_text().count("build") == 1  # the second process waited and read the cache
    names = [p.name for p in (cache / "splits").iterdir()]
    assert [n for n in names if not n.endswith(".lock")] == [results[0]["key"]]  # no temporary folders
    split, key = load_split(cfg)
    assert key == results[0]["key"] and [getattr(split, m).nnz for m in MATS] == results[0]["nnz"]


def test_clean_cache(env):
    _, cache = env
    load_split(cfg_for())
    size = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    assert clean_cache() == size > 0 and not cache.exists()
    assert clean_cache() == 0


def test_stats_and_errors(env):
    data, _ = env
    raw = dataset_stats(cfg_for())
    assert raw["users"] == 30 and raw["interactions"] == len((data / "log.csv").read_text().splitlines()) - 1
    assert raw["density"] == pytest.approx(raw["interactions"] / (30 * raw["items"]))
    strict = dataset_stats(cfg_for(min_rating=5, min_user_interactions=2))
    assert strict["interactions"] < raw["interactions"]
    with pytest.raises(EmptyDataError, match="min_user_interactions=1000"):
        load_split(cfg_for(min_user_interactions=1000))
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_split(DataConfig(name="x", path="nope.csv"))


def test_config_is_strict():
    from fishertune.config import ConfigError, load_config

    cfg = load_config(DataConfig, overrides=["name=ml-1m", "split.protocol=held_out_users",
                                             "split.n_valid_users=600", "min_rating=4"])
    assert cfg.split.n_valid_users == 600 and cfg.min_rating == 4
    with pytest.raises(ConfigError, match="unknown key 'split.n_valid'"):
        load_config(DataConfig, overrides=["split.n_valid=3"])
    with pytest.raises(ConfigError, match="must be < 1"):
        load_config(DataConfig, overrides=["split.valid_ratio=0.5", "split.test_ratio=0.5"])


def test_real_stats(data_root, tmp_path, monkeypatch):
    data_root("ml-100k")
    monkeypatch.setenv("FISHERTUNE_CACHE", str(tmp_path))
    assert dataset_stats("ml-100k") == {"users": 943, "items": 1682, "interactions": 100000,
                                        "density": pytest.approx(100000 / (943 * 1682))}
    split, _ = load_split(DataConfig(name="ml-100k"))
    assert split.test_target.nnz == split.valid_target.nnz == 943 and split.train.nnz == 100000 - 2 * 943
