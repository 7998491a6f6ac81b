"""Checkpoints (safe loading, RNG states, data hash, atomicity) and run directories."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch

import fishertune.recsys.checkpoint as ckpt_mod
from fishertune.recsys.checkpoint import (CheckpointError, get_rng_state, load_checkpoint, save_checkpoint,
                                          set_rng_state)
from fishertune.recsys.rundir import RunDir, new_run_dir, plot_history


def _state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "data_hash": "abc",
            "config": {"model": {"name": "x", "dims": [1, 2]}, "lr": 1e-3, "amp": False, "none": None},
            "history": [{"epoch": 1, "train": {"loss": 1.5}, "valid": {"ndcg@10": 0.25}}],
            "rng": [get_rng_state()]}


def _model_and_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()  # the optimiser now holds state tensors
    return model, opt


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model, opt = _model_and_optimizer()
    path = save_checkpoint(tmp_path / "c.pt", _state(model, opt))
    raw = torch.load(path, weights_only=True)  # the safe loader accepts everything in it
    assert raw["format_version"] == ckpt_mod.FORMAT_VERSION and raw["config"]["none"] is None
    state = load_checkpoint(path, data_hash="abc")
    fresh, fresh_opt = _model_and_optimizer()
    fresh.load_state_dict(state["model"])
    fresh_opt.load_state_dict(state["optimizer"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert state["history"] == _state(model, opt)["history"]


def test_data_hash_mismatch_names_both_hashes(tmp_path):
    model, opt = _model_and_optimizer()
    path = save_checkpoint(tmp_path / "c.pt", _state(model, opt))
    with pytest.raises(CheckpointError, match=r"'abc'.*'def'"):
        load_checkpoint(path, data_hash="def")
    assert load_checkpoint(path, data_hash=None)["epoch"] == 3  # no check asked


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a fishertune checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = _model_and_optimizer()
    path = save_checkpoint(tmp_path / "c.pt", _state(model, opt))

    def broken_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpo")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"epoch": 4})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


def test_rng_state_round_trip_restores_every_stream(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.normal()  # a cached gaussian in NumPy's legacy state
    path = save_checkpoint(tmp_path / "rng.pt", {"rng": get_rng_state()})
    expected = (torch.rand(4), np.random.rand(4), np.random.normal(), [random.random() for _ in range(4)])
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    set_rng_state(load_checkpoint(path)["rng"])
    got = (torch.rand(4), np.random.rand(4), np.random.normal(), [random.random() for _ in range(4)])
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and got[3] == expected[3]


def test_new_run_dir_names_by_time_and_model(tmp_path):
    a = new_run_dir(tmp_path / "runs", "ml-1m multvae")
    b = new_run_dir(tmp_path / "runs", "ml-1m multvae")
    assert a.is_dir() and b.is_dir() and a != b
    assert re.fullmatch(r"\d{8}-\d{6}-ml-1m-multvae", a.name)
    assert b.name.startswith(a.name[:15]) and b.name.endswith(("-2", "multvae"))


def test_run_dir_writes_each_file_and_a_disabled_one_writes_nothing(tmp_path):
    rd = RunDir(tmp_path / "main")
    rd.write_config({"model": {"name": "ease"}})
    rd.log("hello", flush=True)
    history = [{"epoch": e, "train": {"loss": 3.0 - e, "kl": 0.1 * e, "beta": 0.01 * e, "l2": 0.0},
                "valid": {"ndcg@10": 0.1 * e}} for e in (1, 2)]
    rd.write_history(history)
    rd.write_json("metrics.json", {"x": float("nan"), "y": 1.0})
    rd.plot(history, "ndcg@10")
    files = sorted(p.name for p in (tmp_path / "main").iterdir())
    assert files == ["config.yaml", "curves.png", "history.jsonl", "metrics.json", "train.log"]
    assert "hello" in (tmp_path / "main" / "train.log").read_text()
    assert json.loads((tmp_path / "main" / "metrics.json").read_text()) == {"x": "nan", "y": 1.0}
    assert [json.loads(line)["epoch"] for line in (tmp_path / "main" / "history.jsonl").open()] == [1, 2]
    # the log of a resumed run continues the old one
    rd2 = RunDir(tmp_path / "main")
    rd2.log("again", flush=True)
    assert (tmp_path / "main" / "train.log").read_text().count("\n") == 2

    off = RunDir(tmp_path / "other", enabled=False)
    off.write_config({"a": 1}), off.log("x", flush=True), off.write_history(history), off.plot(history)
    off.save_checkpoint({"epoch": 1})
    assert not (tmp_path / "other").exists()


def test_plot_history_draws_terms_and_metric():
    history = [{"epoch": e, "train": {"loss": 1.0 / e, "kl": float(e), "beta": 0.001 * e},
                "valid": {"ndcg@100": [0.1, float("nan"), 0.3][e - 1]}} for e in (1, 2, 3)]
    png = plot_history(history, "ndcg@100")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert plot_history([{"epoch": 1, "train": {}, "valid": {}}])[:4] == b"\x89PNG"
