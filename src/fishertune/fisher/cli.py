"""``fishertune fisher``: compute a diagonal Fisher for a model (a recsys run directory or config, a
``.pt`` bundle, or any ``--loader module:function``) and write a report from a stored Fisher.

    fishertune fisher compute RUN_DIR_OR_CONFIG [key=value ...] --kind empirical --reduction layer --out F.safetensors
    fishertune fisher report F.safetensors --out DIR

The lead wires this in with ``register(subparsers)``; the core never imports fishertune.recsys (the
recsys hook is looked up lazily, see :mod:`fishertune.fisher.target`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()

KINDS = ("empirical", "true", "exact")
REDUCTIONS = ("parameter", "channel", "layer", "head")


def register(subparsers) -> None:
    """Add the ``fisher`` command (``compute`` and ``report``) to an argparse subparsers object."""
    fisher = subparsers.add_parser("fisher", help="Fisher information of a model: compute and report")
    sub = fisher.add_subparsers(dest="fisher_command", required=True)

    p = sub.add_parser("compute", help="diagonal Fisher of a run directory / config / .pt bundle")
    p.add_argument("target", help="recsys run directory or config, a .pt bundle, or what --loader accepts")
    p.add_argument("overrides", nargs="*", help="key=value passed to the loader (configs)")
    p.add_argument("--kind", choices=KINDS, default="empirical")
    p.add_argument("--likelihood", help="override the target's likelihood (categorical, multinomial, ...)")
    p.add_argument("--n-samples", type=int, default=1, help="Monte-Carlo targets per input (--kind true)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--reduction", choices=REDUCTIONS, default="layer", help="summary printed and stored as default")
    p.add_argument("--split", default="train", help="which data the loader should use (if it supports it)")
    p.add_argument("--max-batches", type=int)
    p.add_argument("--token-level", action="store_true")
    p.add_argument("--device", help="cpu, cuda, ... (default: where the model is)")
    p.add_argument("--storage", default="cpu", help="cpu | cpu-fp16 | cuda")
    p.add_argument("--task", default="fisher", help="task name inside the file")
    p.add_argument("--loader", help="module:function returning the model and data for TARGET")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.set_defaults(func=cmd_compute)

    p = sub.add_parser("report", help="bar chart, heatmaps, histogram and capacity metrics of a stored Fisher")
    p.add_argument("file", help="a .safetensors file written by 'fisher compute' or FisherStore.save")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--task", help="task to report (default: the first)")
    p.add_argument("--by", choices=("parameter", "layer"), help="grouping of the bar chart (default: stored)")
    p.add_argument("--max-heatmaps", type=int, default=24)
    p.set_defaults(func=cmd_report)


def cmd_compute(args: argparse.Namespace) -> int:
    from fishertune.fisher.estimators import diagonal_fisher
    from fishertune.fisher.reductions import ranked, reduce
    from fishertune.fisher.store import FisherStore
    from fishertune.fisher.target import resolve_target

    target = resolve_target(args.target, loader=args.loader, split=args.split, overrides=list(args.overrides),
                            device=args.device)
    model = target.model
    if args.device:
        model = model.to(args.device)
    res = diagonal_fisher(model, target.loader, likelihood=args.likelihood or target.likelihood, kind=args.kind,
                          n_samples=args.n_samples, temperature=args.temperature, token_level=args.token_level,
                          device=args.device, batch_to_inputs=target.batch_to_inputs,
                          output_transform=target.output_transform, max_batches=args.max_batches)
    store = FisherStore(args.storage)
    meta = {"source": str(args.target), "reduction": args.reduction, "task": args.task,
            "target": target.name, **target.meta}
    store.put(args.task, res, meta=meta)
    out = store.save(args.out, model)
    layout = model if args.reduction == "head" else None
    summary = reduce(res.fisher, args.reduction, layout=layout)
    table = Table(title=f"{args.kind} Fisher, {res.n_samples:,} samples, trace {res.trace():.4g}: top by {args.reduction}")
    table.add_column(args.reduction)
    table.add_column("trace", justify="right")
    for name, value in ranked(summary, top=15):
        table.add_row(name, f"{value:.4g}")
    console.print(table)
    console.print(f"paths: {', '.join(f'{k} ({len(v)})' for k, v in res.paths.items())}"
                  + (f"; skipped {res.skipped_batches} non-finite batch(es)" if res.skipped_batches else ""))
    console.print(f"wrote {out} ({Path(out).stat().st_size / 2**20:.1f} MiB)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fishertune.fisher.report import write_report
    from fishertune.fisher.store import FisherStore

    store = FisherStore.load(args.file)
    if not store.tasks:
        raise ValueError(f"{args.file}: holds no Fisher task")
    task = args.task or store.tasks[0]
    if task not in store:
        raise KeyError(f"{args.file}: no task {task!r}; tasks: {store.tasks}")
    meta = store.meta(task)
    by = args.by or ("parameter" if meta.get("reduction") == "parameter" else "layer")
    path = write_report(store.get(task), args.out, meta={**meta, "task": task}, by=by,
                        max_heatmaps=args.max_heatmaps, title=f"Fisher report: {Path(args.file).name} / {task}")
    console.print(f"wrote {path} and its figures")
    return 0
