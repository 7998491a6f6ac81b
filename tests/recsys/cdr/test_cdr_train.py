"""Trainer, sampled evaluation vs brute force, resume, FisherTune end-to-end, the experiments runner."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from cdr_helpers import TINY

from fishertune.cli import main
from fishertune.recsys.cdr.batches import eval_batch
from fishertune.recsys.cdr.config import load_cdr_config
from fishertune.recsys.cdr.experiments import read_results, run_experiments
from fishertune.recsys.cdr.train import _monitor, build_context, evaluate_stage, train_cdr

ROW_KEYS = {"preset", "seed", "task", "domains", "protocol", "selection", "config", "run_dir", "metrics",
            "best_epoch", "epochs_run", "stop_reason", "time_per_epoch_s", "fisher_time_s", "active_ratio", "history",
            "fisher_summary", "importance_hist"}


def _cfg(*extra: str, preset: dict | None = None):
    return load_cdr_config(None, [*TINY, *extra], preset=preset)


def test_shortcuts_and_defaults(cdr_root):
    cfg = load_cdr_config(None, ["domains=aa_bb", "task=dual-user-inter", "train.lr=0.004"])
    assert cfg.data.domains == "aa_bb" and cfg.data.task == "dual-user-inter"
    assert not cfg.fishertune.use_fishertune and cfg.fishertune.shared_lr == 0.004  # baseline, same rates
    ft = load_cdr_config(None, ["train.lr=0.004"], preset={"shared_lr": 0.001}).fishertune
    assert ft.use_fishertune and ft.shared_lr == 0.001 and ft.specific_lr == 0.004
    with pytest.raises(Exception, match="unknown key 'model.nope'"):
        load_cdr_config(None, ["model.nope=1"])


@pytest.mark.parametrize("aggregator", ["mean", "user_attention", "item_similarity"])
def test_sampled_evaluation_matches_brute_force(cdr_root, aggregator):
    cfg = _cfg(f"model.aggregator={aggregator}")
    ctx = build_context(cfg)
    ctx.model.eval()
    for dom in ctx.data.domains:
        got = evaluate_stage(ctx, dom, "test")
        part = ctx.data[dom]
        d = ctx.data.domains.index(dom)
        users = torch.from_numpy(part.users["test"])
        ranks = []
        for r in range(len(users)):  # one instance at a time; histories fit in eval_max_len, so no sampling
            with torch.no_grad():
                s = ctx.model.score_all(eval_batch(ctx.hist_full, d, users[r:r + 1], "dual-user-intra", 16, None))[0]
            t = s[int(part.items["test"][r])]
            ranks.append(1 + int((s[torch.from_numpy(part.negatives["test"][r])] >= t).sum()))
        ranks = np.array(ranks)
        assert got["n"] == len(ranks)
        assert got["HR@1"] == pytest.approx(np.mean(ranks <= 1))
        assert got["HR@5"] == pytest.approx(np.mean(ranks <= 5))
        assert got["MRR"] == pytest.approx(np.mean(1 / ranks))
        ndcg = np.where(ranks <= 5, 1 / np.log2(ranks + 1), 0)
        assert got["NDCG@5"] == pytest.approx(ndcg.mean())
    full = evaluate_stage(ctx, "aa", "test", full=True)
    assert {"HR@10", "HR@20", "NDCG@10", "NDCG@20", "MRR"} <= set(full)


def test_validation_builds_matrices_and_checks_negatives_once(cdr_root):
    """Per-epoch validation reuses its matrices and skips the negatives' item check after the first
    pass; the metrics are the same (evaluation contexts are seeded per stage)."""
    ctx = build_context(_cfg())
    first = _monitor(ctx)
    assert ctx.negatives_checked == {("aa", "valid"), ("bb", "valid")} and set(ctx.eval_mats) == ctx.negatives_checked
    mats = dict(ctx.eval_mats)
    assert _monitor(ctx) == first
    assert all(ctx.eval_mats[k] is mats[k] for k in mats)


def test_baseline_trains_and_writes_run_dir(cdr_root, tmp_path):
    cfg = _cfg("train.epochs=3")
    res = train_cdr(cfg, tmp_path / "run", echo=False)
    assert res["epochs_run"] == 3 and res["protocol"] == "sampled" and res["selection"] == "validation"
    assert res["stop_reason"] == "epochs"
    assert 1 <= res["best_epoch"] <= 3
    for dom in ("aa", "bb"):
        for stage in ("valid", "test", "test_full"):
            assert all(math.isfinite(v) for v in res["metrics"][dom][stage].values())
    assert res["history"][-1]["loss"] < res["history"][0]["loss"]
    assert res["history"][0]["phase"] == "baseline" and res["active_ratio"] == 1.0
    for name in ("config.yaml", "history.jsonl", "results.json", "checkpoint.pt", "train.log", "curves.png"):
        assert (tmp_path / "run" / name).is_file()
    assert main(["cdr", "evaluate", str(tmp_path / "run")]) == 0


def test_item_bias_and_softmax_train(cdr_root):
    """The sport_cloth settings (item bias, sampled softmax): the loss falls, the biases learn and
    evaluation ranks with them (a popular item's bias ends above a never-seen one's)."""
    cfg = _cfg("train.epochs=3", "model.item_bias=true", "model.rec_loss=softmax", "train.lr=0.01")
    ctx = build_context(cfg)
    res = train_cdr(cfg, None, ctx=ctx, echo=False)
    assert res["history"][-1]["rec"] < res["history"][0]["rec"]
    assert all(math.isfinite(v) for v in res["metrics"]["aa"]["test"].values())
    bias = ctx.model.item_bias["aa"].detach()
    pop = np.asarray(ctx.data["aa"].train.sum(0)).ravel()
    assert float(bias.abs().sum()) > 0
    assert float(bias[int(pop.argmax())]) > float(bias[int(pop.argmin())])
    with pytest.raises(Exception, match="rec_loss"):
        _cfg("model.rec_loss=hinge")


def test_resume_equals_uninterrupted(cdr_root, tmp_path):
    full = train_cdr(_cfg("train.epochs=3"), tmp_path / "a", echo=False)
    train_cdr(_cfg("train.epochs=1"), tmp_path / "b", echo=False)  # "interrupted" after epoch 1
    resumed = train_cdr(_cfg("train.epochs=3"), tmp_path / "b", echo=False)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    assert resumed["metrics"] == full["metrics"]


def test_time_limit_stops_and_tests_the_best_epoch(cdr_root, tmp_path):
    """A budget spent after the first epoch ends training there; the row says why and is complete."""
    res = train_cdr(_cfg("train.epochs=5", "train.time_limit_s=1e-9"), tmp_path / "t", echo=False)
    assert res["epochs_run"] == 1 and res["stop_reason"] == "time_limit" and res["best_epoch"] == 1
    assert all(math.isfinite(v) for v in res["metrics"]["aa"]["test"].values())
    assert "time limit" in (tmp_path / "t" / "train.log").read_text()
    stopped = train_cdr(_cfg("train.epochs=50", "train.patience=1"), None, echo=False)
    assert stopped["stop_reason"] == "early_stop" and stopped["epochs_run"] < 50


def test_refit_trains_on_every_training_interaction(cdr_root, tmp_path):
    """``data.holdout=false``: the sampler and the histories hold the held-out validation items too, no
    epoch is validated, the last one is tested and named; the combinations that need validation fail."""
    held = build_context(_cfg())
    ctx = build_context(_cfg("data.holdout=false", "train.epochs=2"))
    for dom in ctx.data.domains:
        part = ctx.data[dom]
        assert (part.train_full != part.train).nnz > 0  # the tiny data has held-out items to give back
    assert ctx.hist_train is ctx.hist_full and held.hist_train is not held.hist_full
    assert ctx.sampler.n == [ctx.data[d].train_full.nnz for d in ctx.data.domains]
    assert held.sampler.n == [ctx.data[d].train.nnz for d in ctx.data.domains]
    res = train_cdr(ctx.cfg, tmp_path / "r", ctx=ctx, echo=False)
    assert res["selection"].startswith("none (refit") and res["best_epoch"] == res["epochs_run"] == 2
    assert res["stop_reason"] == "epochs" and all("valid" not in h for h in res["history"])
    assert set(res["metrics"]["aa"]) == {"test", "test_full"}
    assert all(math.isfinite(v) for v in res["metrics"]["bb"]["test"].values())
    for bad in (["task=dual-user-inter"], ["protocol=original"]):
        with pytest.raises(Exception, match="dual-user-intra with protocol sampled"):
            _cfg("data.holdout=false", *bad)
    with pytest.raises(Exception, match="adaptive scheduler follows validation"):
        _cfg("data.holdout=false", preset={"use_adaptive_scheduler": True})
    _cfg("data.holdout=false", preset={"use_adaptive_scheduler": False})  # other presets refit


def test_protocol_original_is_labelled(cdr_root, tmp_path):
    res = train_cdr(_cfg("protocol=original", "train.epochs=1"), tmp_path / "o", echo=False)
    assert "TEST-SET SELECTION" in res["selection"]
    assert "TEST-SET SELECTION" in (tmp_path / "o" / "train.log").read_text()


def test_inter_task_trains(cdr_root):
    res = train_cdr(_cfg("task=dual-user-inter", "train.epochs=1"), None, echo=False)
    assert res["metrics"]["aa"]["test"]["n"] == 3


@pytest.mark.parametrize("kind", ["edge_dropout", "popularity", "feature_shift", "combined"])
def test_fishertune_preset_trains(cdr_root, kind):
    preset = {"perturbation_type": kind, "fishertune_warmup": 1, "fim_update_freq": 1,
              "perturbation_noise_std": 0.05}
    res = train_cdr(_cfg("train.epochs=3", preset=preset), None, echo=False)
    assert [h["phase"] for h in res["history"]] == ["warmup", "tune", "tune"]
    assert 0 < res["active_ratio"] < 1
    assert set(res["fisher_summary"]) == {"shared", "specific"}
    assert "drfim_mean" in res["fisher_summary"]["shared"]
    for g in ("shared", "specific"):
        h = res["importance_hist"][g]
        assert len(h["edges"]) == len(h["counts"]) + 1 and sum(h["counts"]) > 0
        assert set(res["history"][-1]["threshold"]) >= {"shared", "specific"}


def test_experiments_runner_schema_and_skip(cdr_root, tmp_path, monkeypatch):
    config = tmp_path / "tiny.yaml"
    data = {}
    for item in TINY:
        key, value = item.split("=")
        sec, k = key.split(".")
        data.setdefault(sec, {})[k] = yaml.safe_load(value)
    data["train"]["epochs"] = 2
    config.write_text(yaml.safe_dump(data))
    results = tmp_path / "exp" / "results.jsonl"
    rows = run_experiments(["baseline", "default"], str(config), seeds=1, results=str(results),
                           overrides=["fishertune.fishertune_warmup=1"])
    assert len(rows) == 2 and len(read_results(results)) == 2
    for row in rows:
        assert set(row) == ROW_KEYS
        assert set(row["metrics"]) == {"aa", "bb"}
        assert {"MRR", "NDCG@10", "HR@1", "HR@10"} <= set(row["metrics"]["aa"]["test"])
        assert set(row["metrics"]["aa"]) == {"test", "valid", "test_full"}
        h = row["history"][0]
        assert {"epoch", "loss", "valid", "phase"} <= set(h)
        json.dumps(row)
    assert {(r["preset"], r["seed"]) for r in rows} == {("baseline", 0), ("default", 0)}
    assert next(r for r in rows if r["preset"] == "default")["config"]["fishertune"]["use_fishertune"]

    import fishertune.recsys.cdr.train as tr

    def boom(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(tr, "train_cdr", boom)
    again = run_experiments(["quick"], str(config), seeds=1, results=str(results),
                            overrides=["fishertune.fishertune_warmup=1"])
    assert len(again) == 2 and len(read_results(results)) == 2
    assert main(["experiments", "run", "baseline", "fishertune.fishertune_warmup=1", "--config", str(config),
                 "--results", str(results)]) == 0
    assert main(["experiments", "run", "nonsense", "--config", str(config)]) == 2
    monkeypatch.setattr(tr, "train_cdr", train_cdr)
    refit = run_experiments(["baseline"], str(config), seeds=1, results=str(results),
                            overrides=["data.holdout=false"])  # a refit is not the held-out run: it trains
    assert len(refit) == 1 and len(read_results(results)) == 3
    assert refit[0]["config"]["data"]["holdout"] is False and "valid" not in refit[0]["metrics"]["aa"]


def test_run_dir_ignores_stop_and_save_keys_only(tmp_path):
    """A run resumes under a new time limit or checkpoint interval; any other change is a new run."""
    from fishertune.recsys.cdr.experiments import RunSpec

    spec = RunSpec("default", 0, "aa_bb", None, (), str(tmp_path / "results.jsonl"))
    cfg = _cfg("train.epochs=3")
    same = _cfg("train.epochs=3", "train.time_limit_s=60", "train.checkpoint_every=7")
    other = _cfg("train.epochs=4")
    assert spec.run_dir(cfg) == spec.run_dir(same)
    assert spec.run_dir(cfg) != spec.run_dir(other)
