"""The experiment runner and the CLI, end to end on small real data (ML-100k)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from fishertune.cli import main
from fishertune.config import ConfigError, load_config
from fishertune.recsys.experiment import CompareConfig, ExperimentConfig, grid_points, summarise

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


SMALL = """
name: tiny
data:
  name: ml-100k
  min_rating: 4
  min_user_interactions: 5
  split: {protocol: held_out_users, n_valid_users: 50, n_test_users: 50, seed: 1}
model: {name: ease, lambda_: 300}
train: {epochs: 2, batch_size: 200, device: cpu, patience: 5, monitor: ndcg@20}
eval: {ks: [10, 20], metrics: [recall, ndcg, mrr], batch_size: 256}
output_dir: OUT
"""


def test_presets_validate() -> None:
    from fishertune.config import read_yaml

    paths = sorted((REPO / "configs").glob("*.yaml"))
    assert paths
    for path in paths:
        load_config(CompareConfig if "models" in read_yaml(path) else ExperimentConfig, path)


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, SMALL.replace("lambda_: 300", "lambda_: 300, lamda: 2"))
    with pytest.raises(ConfigError, match="unknown key 'model.ease.lamda'|lamda"):
        load_config(ExperimentConfig, path)
    with pytest.raises(ConfigError, match="trian"):
        load_config(ExperimentConfig, _write(tmp_path, SMALL), ["trian.lr=1"])


def test_monitor_must_be_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="recall@50"):
        load_config(ExperimentConfig, _write(tmp_path, SMALL), ["train.monitor=recall@50"])


def test_cli_reports_a_bad_key_without_traceback(tmp_path: Path, capsys) -> None:
    path = _write(tmp_path, SMALL)
    assert main(["train", str(path), "train.epoch=3"]) == 2
    assert "train.epoch" in capsys.readouterr().out


def test_grid_points_cover_the_product() -> None:
    points = grid_points({"model.a": [1, 2], "train.lr": [0.1, 0.2, 0.3]})
    assert len(points) == 6 and {"model.a": 2, "train.lr": 0.3} in points
    assert grid_points({}) == [{}]
    with pytest.raises(ConfigError):
        grid_points({"model.a": []})


def test_summary_selects_on_validation_not_test() -> None:
    rows = [
        {"model": "m", "seed": 0, "point": {"x": 1}, "fit_seconds": 1.0,
         "valid": {"ndcg@10": 0.5}, "test": {"ndcg@10": 0.1}},
        {"model": "m", "seed": 0, "point": {"x": 2}, "fit_seconds": 1.0,
         "valid": {"ndcg@10": 0.4}, "test": {"ndcg@10": 0.9}},
        {"model": "m", "seed": 1, "point": {"x": 2}, "fit_seconds": 1.0,
         "valid": {"ndcg@10": 0.6}, "test": {"ndcg@10": 0.3}},
    ]
    s = summarise(rows, "ndcg@10")["models"]["m"]
    assert s["chosen"] == [{"x": 1}, {"x": 2}]
    assert s["test_mean"]["ndcg@10"] == pytest.approx(0.2)
    assert s["test_std"]["ndcg@10"] == pytest.approx(0.1414213, rel=1e-5)
    with pytest.raises(ConfigError, match="monitor"):
        summarise(rows, "recall@50")


def test_train_evaluate_predict_round_trip(data_root, tmp_path: Path, monkeypatch) -> None:
    data_root("ml-100k")
    monkeypatch.setenv("FISHERTUNE_CACHE", str(tmp_path / "cache"))
    path = _write(tmp_path, SMALL.replace("OUT", str(tmp_path / "runs")))
    run_dir = tmp_path / "run"
    assert main(["train", str(path), "--run-dir", str(run_dir)]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for name in ("config.yaml", "checkpoint.pt"):
        assert (run_dir / name).is_file()
    assert 0 < metrics["test"]["ndcg@20"] <= 1

    # evaluate reloads the checkpoint and gets the same numbers
    from fishertune.recsys.experiment import evaluate_model
    from fishertune.recsys.runs import load_run

    run = load_run(run_dir)
    again = evaluate_model(run.model, run.split, "test", run.cfg.eval)
    assert again["ndcg@20"] == pytest.approx(metrics["test"]["ndcg@20"], abs=1e-9)

    out = tmp_path / "recs.csv"
    assert main(["predict", str(run_dir), "--top-k", "5", "--out", str(out)]) == 0
    recs = pd.read_csv(out)
    assert list(recs.columns) == ["user", "rank", "item", "score"]
    assert recs.groupby("user").size().max() == 5
    # recommendations use original IDs and never repeat the history they were made from
    history, _ = run.split.stage("test")
    users = run.split.user_ids.to_index(recs.user.to_numpy())
    items = run.split.item_ids.to_index(recs.item.to_numpy())
    assert history[users, items].sum() == 0
    assert set(recs.user) == set(run.split.user_ids.to_original(run.split.eval_users("test")))
    assert (recs.groupby("user").score.apply(lambda s: s.is_monotonic_decreasing)).all()


def test_compare_resumes_and_writes_a_summary(data_root, tmp_path: Path, monkeypatch) -> None:
    data_root("ml-100k")
    monkeypatch.setenv("FISHERTUNE_CACHE", str(tmp_path / "cache"))
    text = SMALL.replace("model: {name: ease, lambda_: 300}\n", "").replace("output_dir: OUT", "") + """
models:
  ease: {model: {name: ease}, grid: {model.lambda_: [100, 1000]}}
  pop: {model: {name: popularity}}
seeds: [0, 1]
"""
    path = _write(tmp_path, text)
    out = tmp_path / "cmp"
    assert main(["compare", str(path), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * (2 + 1)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["models"]) == {"ease", "pop"}
    assert summary["models"]["ease"]["test_mean"]["ndcg@20"] > summary["models"]["pop"]["test_mean"]["ndcg@20"]
    # a second call finds every run finished and appends nothing
    assert main(["compare", str(path), "--out", str(out)]) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == len(rows)


def test_data_commands(data_root, tmp_path: Path, monkeypatch, capsys) -> None:
    data_root("ml-100k")
    cache = tmp_path / "cache"
    monkeypatch.setenv("FISHERTUNE_CACHE", str(cache))
    assert main(["data", "stats", "ml-100k"]) == 0
    out = capsys.readouterr().out
    assert "943" in out and "1,682" in out and "100,000" in out
    path = _write(tmp_path, SMALL)
    assert main(["data", "prepare", str(path)]) == 0
    assert any(cache.rglob("*.npz"))
    assert main(["data", "clean"]) == 0
    assert not any(cache.rglob("*.npz"))
    assert main(["data", "stats", "no-such-dataset"]) == 2


def test_fisher_of_a_trained_multvae_run(data_root, tmp_path: Path, monkeypatch) -> None:
    """`fishertune fisher compute RUN_DIR` equals the engine called directly on the run's model."""
    data_root("ml-100k")
    monkeypatch.setenv("FISHERTUNE_CACHE", str(tmp_path / "cache"))
    text = SMALL.replace("model: {name: ease, lambda_: 300}",
                         "model: {name: multvae, hidden_dims: [20], latent_dim: 8}")
    run_dir = tmp_path / "run"
    assert main(["train", str(_write(tmp_path, text)), "--run-dir", str(run_dir)]) == 0
    out = tmp_path / "F.safetensors"
    assert main(["fisher", "compute", str(run_dir), "--out", str(out), "--max-batches", "2"]) == 0

    from safetensors.torch import load_file

    from fishertune.fisher import diagonal_fisher
    from fishertune.recsys.fisher import load_model_and_data

    stored = load_file(out)
    target = load_model_and_data(run_dir)
    direct = diagonal_fisher(target.model, target.loader, likelihood="multinomial", max_batches=2,
                             progress=False)
    assert len(direct.fisher) > 0
    for name, value in direct.fisher.items():
        match = [k for k in stored if k.endswith(name)]
        assert match, f"{name} missing from {sorted(stored)[:5]}"
        assert torch.allclose(stored[match[0]].float(), value.float(), rtol=1e-5, atol=1e-12)
        assert torch.isfinite(value).all() and value.sum() > 0

    ease_dir = tmp_path / "ease"
    assert main(["train", str(_write(tmp_path, SMALL)), "--run-dir", str(ease_dir)]) == 0
    assert main(["fisher", "compute", str(ease_dir), "--out", str(tmp_path / "E.safetensors")]) == 2
