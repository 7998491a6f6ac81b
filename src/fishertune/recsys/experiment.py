"""Experiments: one run (data -> model -> train -> test) and a comparison of models with
hyper-parameters chosen on validation only.

A run directory holds the resolved config, metrics, history, log, checkpoint and curves; a comparison
directory holds one sub-run per (seed, model, grid point), a results table (JSONL, appended as runs
finish, so an interrupted comparison resumes where it stopped) and a summary (markdown + JSON).
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from fishertune.config import ConfigError, StrictModel, deep_merge, dump_config, validate
from fishertune.recsys.data import DataConfig, load_split
from fishertune.recsys.data.types import Split
from fishertune.recsys.evaluate import evaluate_full, evaluate_sampled
from fishertune.recsys.models import ModelConfig, Recommender, build_model
from fishertune.recsys.train import TrainConfig, is_main_process, resolve_device, train
from fishertune.utils.io import append_jsonl, atomic_write_json, atomic_write_text, file_lock


class EvalConfig(StrictModel):
    """How validation and test are scored."""

    protocol: Literal["full", "sampled"] = "full"
    ks: list[int] = Field(default_factory=lambda: [10, 20, 50, 100])
    metrics: list[str] = Field(default_factory=lambda: ["recall", "ndcg", "hr", "mrr", "precision"])
    batch_size: int = 1024
    n_negatives: int = 99
    negatives_seed: int = 0
    negatives: Literal["sample", "dataset"] = Field(
        "sample", description="sampled protocol: draw seeded negatives, or use the fixed ones the dataset "
                              "ships (lastfm: seq/LastFM_sample.txt)")

    def metric_names(self) -> set[str]:
        """Names the evaluator reports (``ndcg@10``, ``mrr`` ...) under this config."""
        return {m if m == "mrr" else f"{m}@{k}" for m in self.metrics for k in self.ks}


def _check_monitor(train: "TrainConfig", eval: EvalConfig) -> None:
    if train.monitor not in eval.metric_names():
        raise ValueError(f"train.monitor '{train.monitor}' is not reported by eval (it reports "
                         f"{sorted(eval.metric_names())}); add it to eval.metrics / eval.ks")


class ExperimentConfig(StrictModel):
    """One model trained and evaluated on one split."""

    name: str = "run"
    data: DataConfig
    model: ModelConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output_dir: str = "runs"

    @model_validator(mode="after")
    def _monitor(self) -> "ExperimentConfig":
        _check_monitor(self.train, self.eval)
        return self


class Candidate(StrictModel):
    """A model in a comparison: its base settings and a grid searched on validation."""

    model: dict[str, Any]
    train: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)


class CompareConfig(StrictModel):
    """Several models on the same data, each tuned on validation, reported on test over seeds."""

    name: str = "compare"
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    models: dict[str, Candidate]
    seeds: list[int] = Field(default_factory=lambda: [0])
    seed_data: bool = True  # vary the split's seed with the run seed (spread includes the split)
    output_dir: str = "runs"

    @model_validator(mode="after")
    def _monitor(self) -> "CompareConfig":
        _check_monitor(self.train, self.eval)
        return self


# ---------------------------------------------------------------------------------------------
# scoring


def make_score_fn(model: Recommender, device: torch.device):
    """``score_fn(users, history)`` for the evaluator, in eval mode and without gradients."""

    @torch.no_grad()
    def score_fn(users: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        model.eval()
        return model.score(users.to(device), history.to(device))

    return score_fn


def evaluate_model(model: Recommender, split: Split, stage: str, cfg: EvalConfig,
                   device: torch.device | str = "cpu", distributed: bool = False,
                   return_per_user: bool = False) -> dict[str, Any]:
    """Score ``stage`` ("valid" or "test") of ``split`` with the configured protocol."""
    device = torch.device(device)
    inputs, target = split.stage(stage)
    score_fn = make_score_fn(model, device)
    if cfg.protocol == "full":
        return evaluate_full(score_fn, inputs, target, ks=tuple(cfg.ks), metrics=tuple(cfg.metrics),
                             batch_size=cfg.batch_size, device=device, distributed=distributed,
                             return_per_user=return_per_user)
    # negatives are drawn once per call from the seed, among items outside the user's input and target,
    # or read from the dataset's negatives file
    negatives = dataset_negatives(split) if cfg.negatives == "dataset" else None
    n_neg = negatives.shape[1] if negatives is not None else cfg.n_negatives
    return evaluate_sampled(score_fn, inputs, target, n_negatives=cfg.n_negatives, negatives=negatives,
                            seed=cfg.negatives_seed, ks=tuple(k for k in cfg.ks if k <= n_neg + 1),
                            batch_size=cfg.batch_size, device=device, distributed=distributed,
                            return_per_user=return_per_user)


def dataset_negatives(split: Split) -> np.ndarray:
    """The fixed negatives a dataset ships (``lastfm``), as an ``n_users x N`` index matrix for
    ``split`` (read once, kept in ``split.meta``)."""
    cached = split.meta.get("dataset_negatives")
    if cached is not None:
        return cached
    from fishertune.recsys.data import negatives_matrix
    from fishertune.recsys.data.registry import load_negatives

    config = split.meta.get("config") or {}
    if config.get("path") or not config.get("name"):
        raise ConfigError("eval.negatives=dataset needs a registered dataset that ships negatives (lastfm), "
                          "loaded by name")
    neg = negatives_matrix(load_negatives(config["name"]), split.user_ids, split.item_ids)
    split.meta["dataset_negatives"] = neg
    return neg


# ---------------------------------------------------------------------------------------------
# one run


def run_experiment(cfg: ExperimentConfig, run_dir: str | Path, split: Split | None = None,
                   data_hash: str | None = None) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.data``, select on validation, score test once; write ``run_dir``.

    A run directory that already holds ``metrics.json`` is returned as is (finished runs are not
    repeated); one with a checkpoint but no metrics resumes from it.
    """
    run_dir = Path(run_dir)
    done = run_dir / "metrics.json"
    if done.is_file():
        return json.loads(done.read_text())
    if split is None:
        split, data_hash = load_split(cfg.data)
    device = resolve_device(cfg.train.device)
    model = build_model(cfg.model, n_users=split.n_users, n_items=split.n_items, seed=cfg.train.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))

    def evaluate_fn(m: Recommender, stage: str) -> dict[str, float]:
        return evaluate_model(m, split, stage, cfg.eval, device=device,
                              distributed=torch.distributed.is_available() and torch.distributed.is_initialized())

    t0 = time.perf_counter()
    result = train(model, split, cfg.train, evaluate_fn, run_dir, data_hash=data_hash or "",
                   config=cfg.model_dump(mode="json"))
    fit_seconds = time.perf_counter() - t0
    test = evaluate_fn(model, "test")  # `train` leaves the best-on-validation state in `model`
    metrics = {"name": cfg.name, "model": cfg.model.name, "data_hash": data_hash,
               "best_epoch": result.best_epoch, "valid": result.best_valid, "test": test,
               "fit_seconds": fit_seconds,
               "seconds_per_epoch": result.seconds_per_epoch}
    if is_main_process():
        atomic_write_json(done, metrics)
    return metrics


# ---------------------------------------------------------------------------------------------
# comparison


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """All combinations of a grid ``{"model.lambda_": [1, 2], ...}`` as dotted-key dicts."""
    if not grid:
        return [{}]
    keys = sorted(grid)
    for key in keys:
        if not isinstance(grid[key], list) or not grid[key]:
            raise ConfigError(f"grid '{key}' must be a non-empty list")
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _nest(dotted: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _point_name(point: dict[str, Any]) -> str:
    if not point:
        return "default"
    return ",".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(point.items()))


def expand(cfg: CompareConfig) -> list[tuple[int, str, dict[str, Any], ExperimentConfig]]:
    """Every (seed, model key, grid point, experiment config) of a comparison, validated up front."""
    runs = []
    base = cfg.model_dump(mode="json")
    for seed in cfg.seeds:
        for key, cand in cfg.models.items():
            for point in grid_points(cand.grid):
                data = dict(base["data"])
                if cfg.seed_data:
                    data = deep_merge(data, {"split": {"seed": seed}})
                exp = {"name": f"{key}", "data": data, "model": cand.model,
                       "train": deep_merge(deep_merge(base["train"], cand.train), {"seed": seed}),
                       "eval": base["eval"], "output_dir": cfg.output_dir}
                exp = deep_merge(exp, _nest(point))
                runs.append((seed, key, point, validate(ExperimentConfig, exp, source=f"models.{key}")))
    return runs


def run_comparison(cfg: CompareConfig, out_dir: str | Path, monitor: str | None = None,
                   console=None) -> dict[str, Any]:
    """Run every candidate, pick each model's grid point on validation per seed, report test."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.yaml", dump_config(cfg))
    monitor = monitor or cfg.train.monitor
    results_path = out_dir / "results.jsonl"
    rows: list[dict[str, Any]] = []
    splits: dict[str, tuple[Split, str]] = {}
    for seed, key, point, exp in expand(cfg):
        run_dir = out_dir / f"seed{seed}" / key / _point_name(point)
        finished = (run_dir / "metrics.json").is_file()
        if not finished:
            data_key = exp.data.model_dump_json()
            if data_key not in splits:
                splits.clear()  # keep one split in memory at a time
                splits[data_key] = load_split(exp.data)
            split, data_hash = splits[data_key]
            if console is not None:
                console.print(f"[bold]seed {seed}[/] {key} {_point_name(point)}")
            metrics = run_experiment(exp, run_dir, split=split, data_hash=data_hash)
        else:
            metrics = json.loads((run_dir / "metrics.json").read_text())
        row = {**metrics, "seed": seed, "model": key, "point": point, "run_dir": str(run_dir)}
        rows.append(row)
        if not finished:
            with file_lock(results_path):
                append_jsonl(results_path, row, default=float)
    summary = summarise(rows, monitor)
    atomic_write_json(out_dir / "summary.json", summary)
    atomic_write_text(out_dir / "summary.md", summary_markdown(summary, cfg.eval.ks))
    return summary


def summarise(rows: list[dict[str, Any]], monitor: str) -> dict[str, Any]:
    """Per model and seed keep the grid point best on validation ``monitor``; mean and std of test."""
    chosen: dict[str, list[dict[str, Any]]] = {}
    for (model, seed), group in itertools.groupby(
            sorted(rows, key=lambda r: (r["model"], r["seed"])), key=lambda r: (r["model"], r["seed"])):
        group = list(group)
        if monitor not in group[0]["valid"]:
            raise ConfigError(f"monitor '{monitor}' is not among the validation metrics "
                              f"{sorted(group[0]['valid'])}")
        best = max(group, key=lambda r: r["valid"][monitor])
        chosen.setdefault(model, []).append(best)
    out: dict[str, Any] = {"monitor": monitor, "models": {}}
    for model, best_rows in chosen.items():
        names = [k for k in best_rows[0]["test"] if k != "n_users"]
        test = {k: [float(r["test"][k]) for r in best_rows] for k in names}
        out["models"][model] = {
            "seeds": [r["seed"] for r in best_rows],
            "chosen": [r["point"] for r in best_rows],
            "test_mean": {k: float(np.mean(v)) for k, v in test.items()},
            "test_std": {k: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for k, v in test.items()},
            "valid_mean": {monitor: float(np.mean([r["valid"][monitor] for r in best_rows]))},
            "fit_seconds_mean": float(np.mean([r["fit_seconds"] for r in best_rows])),
        }
    return out


def summary_columns(summary: dict[str, Any], ks: list[int]) -> list[str]:
    first = next(iter(summary["models"].values()))
    preferred = [f"{m}@{k}" for m in ("recall", "hr", "ndcg") for k in ks] + ["mrr"]
    return [c for c in preferred if c in first["test_mean"]]


def summary_markdown(summary: dict[str, Any], ks: list[int]) -> str:
    cols = summary_columns(summary, ks)
    lines = [f"Test metrics, mean ± std over seeds; hyper-parameters chosen on validation "
             f"({summary['monitor']}).", "",
             "| model | " + " | ".join(cols) + " | fit s | chosen |",
             "|---|" + "---|" * (len(cols) + 2)]
    for model, s in summary["models"].items():
        cells = [f"{s['test_mean'][c]:.4f} ± {s['test_std'][c]:.4f}" for c in cols]
        chosen = "; ".join(_point_name(p) for p in s["chosen"])
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {s['fit_seconds_mean']:.1f} | {chosen} |")
    return "\n".join(lines) + "\n"
