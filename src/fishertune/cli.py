"""The ``fishertune`` command: a thin layer over the library (each handler imports what it needs)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table

console = Console(width=None if Console().is_terminal else 140)


def _fail(message: str) -> int:
    console.print(f"[bold red]error:[/] {message}")
    return 2


# -- train / compare / evaluate / predict -----------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from fishertune.config import load_config
    from fishertune.recsys.experiment import ExperimentConfig, run_experiment

    cfg = load_config(ExperimentConfig, args.config, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else _new_run_dir(cfg.output_dir, f"{cfg.name}-{cfg.model.name}")
    console.print(f"run directory: {run_dir}")
    metrics = run_experiment(cfg, run_dir)
    _print_metrics(f"{cfg.name} / {cfg.model.name}: test", metrics["test"])
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from fishertune.config import load_config
    from fishertune.recsys.experiment import CompareConfig, run_comparison, summary_columns

    cfg = load_config(CompareConfig, args.config, args.overrides)
    out = Path(args.out) if args.out else _new_run_dir(cfg.output_dir, cfg.name)
    console.print(f"comparison directory: {out}  (re-run with --out {out} to resume)")
    t0 = time.perf_counter()
    summary = run_comparison(cfg, out, console=console)
    cols = summary_columns(summary, cfg.eval.ks)
    table = Table(title=f"{cfg.name}: test, mean ± std over seeds {cfg.seeds} "
                        f"(chosen on validation {summary['monitor']})")
    for col in ["model", *cols, "fit s"]:
        table.add_column(col, justify="left" if col == "model" else "right")
    for model, s in summary["models"].items():
        table.add_row(model, *(_mean_std(s['test_mean'][c], s['test_std'][c], len(s['seeds'])) for c in cols),
                      f"{s['fit_seconds_mean']:.1f}")
    console.print(table)
    console.print(f"done in {time.perf_counter() - t0:.0f} s; summary: {out / 'summary.md'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fishertune.recsys.experiment import evaluate_model
    from fishertune.recsys.runs import load_run

    run = load_run(args.run_dir)
    metrics = evaluate_model(run.model, run.split, args.stage, run.cfg.eval)
    _print_metrics(f"{args.run_dir}: {args.stage}", metrics)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from fishertune.recsys.runs import load_run, recommend

    run = load_run(args.run_dir)
    frame = recommend(run, top_k=args.top_k, stage=args.stage)
    out = Path(args.out)
    from fishertune.utils.io import atomic_write

    if out.suffix == ".parquet":
        atomic_write(out, lambda p: frame.to_parquet(p, index=False))
    else:
        atomic_write(out, lambda p: frame.to_csv(p, index=False))
    console.print(f"wrote {len(frame)} recommendations for {frame['user'].nunique()} users to {out}")
    return 0


# -- data --------------------------------------------------------------------------------------------


def cmd_data_stats(args: argparse.Namespace) -> int:
    from fishertune.recsys.data import dataset_stats

    stats = dataset_stats(args.name)
    table = Table(title=args.name)
    for key in stats:
        table.add_column(key, justify="right")
    table.add_row(*(f"{v:.6f}" if isinstance(v, float) else f"{v:,}" for v in stats.values()))
    console.print(table)
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from fishertune.config import load_config
    from fishertune.recsys.data import load_split
    from fishertune.recsys.experiment import ExperimentConfig

    cfg = load_config(ExperimentConfig, args.config, args.overrides)
    split, data_hash = load_split(cfg.data)
    console.print(f"prepared {cfg.data.name} ({split.n_users:,} users, {split.n_items:,} items, "
                  f"{split.train.nnz:,} training interactions); hash {data_hash}")
    return 0


def cmd_data_clean(args: argparse.Namespace) -> int:
    from fishertune.recsys.data import clean_cache

    freed = clean_cache()
    console.print(f"removed the processed-data cache ({freed / 2**20:.1f} MiB)")
    return 0


# -- helpers -----------------------------------------------------------------------------------------


def _new_run_dir(root: str, name: str) -> Path:
    from fishertune.recsys.rundir import new_run_dir

    return new_run_dir(root, name)


def _mean_std(mean: float, std: float, n: int) -> str:
    return f"{mean:.4f}" if n < 2 else f"{mean:.4f}±{std:.4f}"


def _print_metrics(title: str, metrics: dict) -> None:
    table = Table(title=title)
    keys = [k for k in metrics if isinstance(metrics[k], (int, float))]
    for key in keys:
        table.add_column(key, justify="right")
    table.add_row(*(f"{metrics[k]:.4f}" if isinstance(metrics[k], float) else str(metrics[k]) for k in keys))
    console.print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fishertune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train and evaluate one model from a YAML config")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value (dotted keys, e.g. train.lr=1e-3)")
    p.add_argument("--run-dir", help="run directory (default: OUTPUT_DIR/<time>-<name>); resumes if it exists")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="compare models, each tuned on validation, over seeds")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--out", help="comparison directory; an existing one is resumed")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("evaluate", help="score a finished run again")
    p.add_argument("run_dir")
    p.add_argument("--stage", choices=["valid", "test"], default="test")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="top-K recommendations per user with original IDs")
    p.add_argument("run_dir")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--out", required=True, help="FILE.csv or FILE.parquet")
    p.add_argument("--stage", choices=["valid", "test"], default="test",
                   help="whose history to recommend from (test: everything the user has seen)")
    p.set_defaults(func=cmd_predict)

    data = sub.add_parser("data", help="datasets and the processed-data cache").add_subparsers(
        dest="data_command", required=True)
    p = data.add_parser("stats", help="users / items / interactions / density of a dataset")
    p.add_argument("name")
    p.set_defaults(func=cmd_data_stats)
    p = data.add_parser("prepare", help="read, filter and split a config's data into the cache")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_data_prepare)
    p = data.add_parser("clean", help="remove the processed-data cache")
    p.set_defaults(func=cmd_data_clean)

    for module in ("fishertune.fisher.cli", "fishertune.recsys.viz.cli", "fishertune.recsys.cdr.report_cli",
                   "fishertune.tune.cli", "fishertune.layers.cli", "fishertune.recsys.cdr.cli"):
        _register_optional(module, sub)
    return parser


def _register_optional(module: str, sub) -> None:
    """Subsystems add their own commands through ``register(subparsers)``."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        return
    mod.register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    from fishertune.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as exc:
        if os.environ.get("FISHERTUNE_DEBUG"):
            raise
        return _fail(f"{exc} (set FISHERTUNE_DEBUG=1 for the traceback)")
    except KeyboardInterrupt:
        console.print("interrupted: finished parts are kept; run the same command again to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
