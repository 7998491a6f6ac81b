"""``fishertune importance`` and ``fishertune compress`` (registered through ``register(subparsers)``).

    fishertune importance MODEL_SPEC --methods block_influence,gate_fisher --set calib=256 --out DIR
    fishertune compress MODEL_SPEC --ratio 1.35 --ratio 1.8 [--by params] --out DIR
    fishertune compress MODEL_SPEC --remove 2,3 --methods ... --random-draws 5 --out DIR

MODEL_SPEC: ``resnet56``, ``resnet20``, ``minilm``, ``FILE.py:FUNCTION`` or ``package.module:FUNCTION``
(see :mod:`fishertune.layers.tasks`); ``--set key=value`` passes adapter options (calibration size...).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _methods(text: str | None, default) -> list[str]:
    if not text:
        return list(default)
    return [m.strip() for m in text.split(",") if m.strip()]


def _console():
    from fishertune.cli import console

    return console


def cmd_importance(args: argparse.Namespace) -> int:
    import torch

    from fishertune.layers.analysers import analyse
    from fishertune.layers.report import DEFAULT_METHODS, expand_methods, write_importance
    from fishertune.layers.tasks import build_task, parse_options

    torch.set_num_threads(args.threads)
    task = build_task(args.model, parse_options(args.set))
    methods = expand_methods(_methods(args.methods, DEFAULT_METHODS), args.random_draws)
    opts = {"greedy": {"max_remove": args.max_remove}} if args.max_remove else None
    results = analyse(task, methods, kind=args.kind, options=opts)
    frame = write_importance(results, args.out, task)
    con = _console()
    con.print(frame.to_string(float_format=lambda v: f"{v:.4g}"))
    con.print(f"wrote {Path(args.out) / 'scores.md'}, scores.csv, scores.png, importance.json")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    import torch

    from fishertune.layers.report import DEFAULT_METHODS, compare_plans, summary_frame
    from fishertune.layers.tasks import build_task, parse_options

    torch.set_num_threads(args.threads)
    if bool(args.ratio) == bool(args.remove):
        raise ValueError("give either --ratio (repeatable) or --remove K1,K2,...")
    counts = [int(k) for k in args.remove.split(",")] if args.remove else None
    task = build_task(args.model, parse_options(args.set))
    opts = {"greedy": {"max_remove": args.max_remove}} if args.max_remove else None
    frame = compare_plans(task, _methods(args.methods, DEFAULT_METHODS), counts=counts, ratios=args.ratio,
                          by=args.by, random_draws=args.random_draws, out=args.out, latency=not args.no_latency,
                          repeats=args.repeats, warmup=args.warmup, threads=args.threads, kind=args.kind,
                          save_weights=args.save_weights, options=opts, latency_device=args.latency_device)
    con = _console()
    con.print(f"dense {task.metric_name}: {frame.attrs['dense_metric']:.4f}")
    con.print(summary_frame(frame).to_string())
    con.print(f"wrote {Path(args.out) / 'results.md'}, results.csv, summary.md, kept.png, scores.*")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL_SPEC", help="resnet56 | resnet20 | minilm | FILE.py:FUNC | module:FUNC")
    p.add_argument("--methods", help="comma-separated analysers (default: all but random); see docs/layers.md")
    p.add_argument("--random-draws", type=int, default=5, help="seeded random orders added as random:0..N-1")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="adapter option, e.g. calib=256")
    p.add_argument("--kind", choices=["empirical", "true"], default="empirical",
                   help="Fisher/gradient targets: observed (empirical) or sampled from the model (true)")
    p.add_argument("--max-remove", type=int, help="greedy: how many blocks to order (default: as needed)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed for latency)")
    p.add_argument("--out", required=True, help="output directory")


def register(sub) -> None:
    p = sub.add_parser("importance", help="score a model's blocks with several methods (table + plot)")
    _common(p)
    p.set_defaults(func=cmd_importance)

    p = sub.add_parser("compress", help="plans per method for target ratios: metric kept, params, latency")
    _common(p)
    p.add_argument("--ratio", type=float, action="append", help="target ratio (repeatable), e.g. 1.35")
    p.add_argument("--by", choices=["blocks", "params"], default="blocks", help="what --ratio counts")
    p.add_argument("--remove", help="comma-separated numbers of blocks to remove instead of --ratio")
    p.add_argument("--repeats", type=int, default=20, help="latency repeats (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--latency-device", help="time copies on this device (e.g. cpu when --set device=cuda)")
    p.add_argument("--save-weights", action="store_true",
                   help="save every plan with its compressed weights (plans/<method>_<target>/)")
    p.set_defaults(func=cmd_compress)
