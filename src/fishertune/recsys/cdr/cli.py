"""``fishertune cdr train|evaluate`` and ``fishertune experiments run`` (registered by ``cli.py``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["register"]


def _console():
    from fishertune.cli import console

    return console


def _table(title: str, metrics: dict) -> None:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("domain")
    table.add_column("stage")
    keys: list[str] = []
    for dom in metrics.values():
        for stage in dom.values():
            keys += [k for k in stage if k not in keys and k != "n"]
    for k in keys:
        table.add_column(k, justify="right")
    for dom, stages in metrics.items():
        for stage, vals in stages.items():
            table.add_row(dom, stage, *(f"{vals[k]:.4f}" if k in vals else "" for k in keys))
    _console().print(table)


def cmd_cdr_train(args: argparse.Namespace) -> int:
    import logging

    from fishertune.recsys.cdr.config import load_cdr_config
    from fishertune.recsys.cdr.train import train_cdr
    from fishertune.recsys.rundir import new_run_dir
    from fishertune.tune import load_presets

    preset = None
    if args.preset:
        presets = load_presets()
        if args.preset not in presets:
            raise ValueError(f"unknown preset {args.preset!r}; presets are {', '.join(presets)}")
        preset = presets[args.preset]
    cfg = load_cdr_config(args.config, args.overrides, preset=preset)
    run_dir = Path(args.run_dir) if args.run_dir else new_run_dir(
        cfg.output_dir, f"{cfg.name}-{cfg.data.domains}-{args.preset or 'run'}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _console().print(f"run directory: {run_dir}  (run again with --run-dir {run_dir} to resume)")
    result = train_cdr(cfg, run_dir)
    title = f"{cfg.data.task} {cfg.data.domains}: best epoch {result['best_epoch']}"
    if cfg.data.protocol == "original":
        title += f" -- {result['selection']}"
    _table(title, result["metrics"])
    return 0


def cmd_cdr_evaluate(args: argparse.Namespace) -> int:
    import yaml

    from fishertune.config import validate
    from fishertune.recsys.cdr.config import CDRConfig
    from fishertune.recsys.cdr.train import (
        SELECTION_LABEL,
        build_context,
        evaluate_model,
    )
    from fishertune.recsys.checkpoint import load_checkpoint

    run_dir = Path(args.run_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml (not a cross-domain run directory)")
    cfg = validate(CDRConfig, yaml.safe_load(cfg_file.read_text()), source=str(cfg_file))
    ctx = build_context(cfg)
    ck = load_checkpoint(run_dir / "checkpoint.pt", data_hash=ctx.data_hash)
    ctx.model.load_state_dict(ck.get("best_model") or ck["model"])
    metrics = evaluate_model(ctx)
    title = f"{run_dir}: best epoch {ck.get('best_epoch')}"
    if cfg.data.protocol == "original":
        title += f" -- {SELECTION_LABEL}"
    _table(title, metrics)
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2))
    return 0


def cmd_experiments_run(args: argparse.Namespace) -> int:
    import logging

    from fishertune.recsys.cdr.experiments import DEFAULT_QUICK_CONFIG, run_experiments

    targets = [t for t in args.targets if "=" not in t]
    overrides = [t for t in args.targets if "=" in t]
    config = args.config
    if config is None and targets == ["quick"]:
        config = DEFAULT_QUICK_CONFIG
    if config is None:
        raise ValueError("give --config CONFIG (e.g. configs/cdr/sport_cloth.yaml); only 'quick' has a default")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    domains = args.domains.split(",") if args.domains else None
    console = _console()

    def on_row(spec, row) -> None:
        state = "skipped (already in the results)" if row is None else f"done, best epoch {row['best_epoch']}"
        console.print(f"[bold]{spec.preset}[/] seed {spec.seed} {spec.domains}: {state}")

    rows = run_experiments(targets, config, args.seeds, args.results, overrides, args.jobs, domains, on_row)
    from fishertune.recsys.cdr.report import print_summary

    negs = sorted({r["config"]["data"]["n_negatives"] for r in rows})
    print_summary(rows, console=console, title=f"test (sampled, {'/'.join(map(str, negs))} negatives), mean ± std "
                                               f"over seeds; {args.results}")
    times = {r["preset"]: [] for r in rows}
    for r in rows:
        times[r["preset"]].append(r["time_per_epoch_s"])
    console.print("time per epoch: " + ", ".join(f"{p} {sum(t) / len(t):.2f} s" for p, t in times.items()))
    if any(r.get("protocol") == "original" for r in rows):
        console.print("[bold red]protocol original: these runs selected their epoch on the test set[/]")
    console.print(f"report: fishertune report {args.results} --out DIR")
    return 0


def register(sub) -> None:
    """Add ``cdr`` and ``experiments`` to the ``fishertune`` command."""
    cdr = sub.add_parser("cdr", help="cross-domain recommendation (UniCDR-style, FisherTune)").add_subparsers(
        dest="cdr_command", required=True)
    p = cdr.add_parser("train", help="train and test one cross-domain run")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value (domains=sport_cloth task=dual-user-intra train.lr=1e-3)")
    p.add_argument("--preset", help="a FisherTune preset from configs/fishertune/presets.yaml (e.g. baseline, default)")
    p.add_argument("--run-dir", help="run directory; an existing one is resumed")
    p.set_defaults(func=cmd_cdr_train)
    p = cdr.add_parser("evaluate", help="test a run directory's best state again")
    p.add_argument("run_dir")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.set_defaults(func=cmd_cdr_evaluate)

    exp = sub.add_parser("experiments", help="FisherTune presets x seeds x domain pairs").add_subparsers(
        dest="experiments_command", required=True)
    p = exp.add_parser("run", help="run presets (quick | all | NAME...), resumable, rows appended to --results")
    p.add_argument("targets", nargs="+", help="quick, all or preset names, then key=value overrides")
    p.add_argument("--config", help="base CDR config (default for quick: configs/cdr/quick.yaml)")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1")
    p.add_argument("--results", default="runs/experiments/results.jsonl")
    p.add_argument("--domains", help="comma-separated pairs (default: the config's data.domains)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (e.g. sharing one GPU)")
    p.set_defaults(func=cmd_experiments_run)
