"""``fishertune viz RUN_DIR VIEW``: pictures of a trained run (see :mod:`fishertune.recsys.viz`).

    fishertune viz RUN_DIR attention --user ID [--stage test]       every layer and head (SASRec, BERT4Rec)
    fishertune viz RUN_DIR attention-summary [--n-users 1000]       layer- and position-wise summaries
    fishertune viz RUN_DIR latent [--method pca|tsne]               Mult-VAE latent means in 2-D
    fishertune viz RUN_DIR reconstruction --user ID                 Mult-VAE input vs reconstruction
    fishertune viz RUN_DIR similar --item ID [--top-k 10]           item-item similarity from item vectors
    fishertune viz RUN_DIR curves                                   training curves (Mult-VAE: loss, KL, beta)

Files go to ``--out`` (default ``RUN_DIR/viz``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()

STAGES = ("train", "valid", "test")


def register(subparsers) -> None:
    """Add the ``viz`` command to an argparse subparsers object."""
    viz = subparsers.add_parser("viz", help="pictures of a trained run: attention, latent space, similar items, curves")
    viz.add_argument("run_dir", help="a run directory (from 'fishertune train' or a comparison's sub-run)")
    sub = viz.add_subparsers(dest="view", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", help="output folder (default: RUN_DIR/viz)")

    p = sub.add_parser("attention", parents=[common], help="attention of every layer and head for one user")
    p.add_argument("--user", required=True, help="original user ID")
    p.add_argument("--stage", choices=STAGES, default="test", help="whose input sequence (default: test)")
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser("attention-summary", parents=[common], help="layer- and position-wise attention summaries")
    p.add_argument("--stage", choices=STAGES, default="test")
    p.add_argument("--n-users", type=int, default=1000, help="users sampled (seeded) for the averages")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_attention_summary)

    p = sub.add_parser("latent", parents=[common], help="Mult-VAE latent means in 2-D")
    p.add_argument("--method", choices=("pca", "tsne"), default="pca")
    p.add_argument("--stage", choices=STAGES, default="train", help="whose rows (default: training users)")
    p.add_argument("--max-users", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_latent)

    p = sub.add_parser("reconstruction", parents=[common], help="Mult-VAE input vs reconstruction for one user")
    p.add_argument("--user", required=True, help="original user ID")
    p.add_argument("--stage", choices=STAGES, help="default: the first of test, valid, train with an input")
    p.add_argument("--top", type=int, default=20)
    p.set_defaults(func=cmd_reconstruction)

    p = sub.add_parser("similar", parents=[common], help="items most similar to an item (cosine of item vectors)")
    p.add_argument("--item", required=True, help="original item ID")
    p.add_argument("--top-k", type=int, default=10, help="neighbours listed (besides the item itself)")
    p.set_defaults(func=cmd_similar)

    p = sub.add_parser("curves", parents=[common], help="training curves (Mult-VAE: total, reconstruction, KL, beta)")
    p.set_defaults(func=cmd_curves)


def _out(args: argparse.Namespace) -> Path:
    out = Path(args.out) if args.out else Path(args.run_dir) / "viz"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _safe(value: object) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(value))


def _load(args: argparse.Namespace):
    from fishertune.recsys.runs import load_run
    from fishertune.recsys.viz._common import item_titles

    run = load_run(args.run_dir)  # prepared to score: sequential models hold their sequences
    return run, item_titles(run.cfg.data.name)


def _check_model(run_dir: str, allowed: tuple[str, ...], view: str) -> None:
    """Refuse a run of another model kind before loading its data (reads config.yaml only)."""
    from fishertune.config import read_yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    name = (read_yaml(path).get("model") or {}).get("name")
    if name not in allowed:
        raise ValueError(f"the {view} view needs a {' / '.join(allowed)} run; {run_dir} trains '{name}'")


def cmd_attention(args: argparse.Namespace) -> int:
    from fishertune.recsys.viz.attention import plot_attention, user_attention

    _check_model(args.run_dir, ("sasrec", "bert4rec"), "attention")
    run, titles = _load(args)
    att = user_attention(run.model, run.split, args.user, args.stage, titles)
    path = plot_attention(att, _out(args) / f"attention_user{_safe(args.user)}_{args.stage}.png")
    console.print(f"{att.weights.shape[0]} layers x {att.weights.shape[1]} heads over {len(att.items)} positions: "
                  f"{path}")
    return 0


def cmd_attention_summary(args: argparse.Namespace) -> int:
    from fishertune.recsys.viz.attention import attention_summary, plot_attention_summary
    from fishertune.utils.io import atomic_write_json

    _check_model(args.run_dir, ("sasrec", "bert4rec"), "attention-summary")
    if args.n_users < 1:
        raise ValueError(f"--n-users must be >= 1, got {args.n_users}")
    run, _ = _load(args)
    summary = attention_summary(run.model, run.split, args.stage, args.n_users, args.seed)
    out = _out(args)
    png = plot_attention_summary(summary, out / f"attention_summary_{args.stage}.png")
    atomic_write_json(out / f"attention_summary_{args.stage}.json", summary)
    table = Table(title=f"attention over {summary['n_users']:,} users ({args.stage})")
    for col in ("layer", "head", "entropy", "mean distance", "self", "last -> itself", "last -> previous", "pad mass"):
        table.add_column(col, justify="right")
    for layer, heads in enumerate(summary["entropy"]):
        for head in range(len(heads)):
            last = summary["last_by_distance"][layer][head]
            table.add_row(str(layer + 1), str(head + 1), f"{summary['entropy'][layer][head]:.3f}",
                          f"{summary['mean_distance'][layer][head]:.2f}", f"{summary['self_weight'][layer][head]:.3f}",
                          f"{last[0]:.3f}", f"{last[1]:.3f}" if len(last) > 1 else "-",
                          f"{summary['pad_mass'][layer][head]:.3f}")
    console.print(table)
    console.print(f"wrote {png} and its numbers beside it (.json)")
    return 0


def cmd_latent(args: argparse.Namespace) -> int:
    from fishertune.recsys.viz.vae import latent_view, plot_latent

    _check_model(args.run_dir, ("multvae",), "latent")
    run, _ = _load(args)
    view = latent_view(run.model, run.split, args.stage, args.method, args.max_users, args.seed)
    path = plot_latent(view, _out(args) / f"latent_{args.method}_{args.stage}.png")
    console.print(f"{len(view.users):,} users' latent means ({args.method}): {path}")
    return 0


def cmd_reconstruction(args: argparse.Namespace) -> int:
    from fishertune.recsys.viz.vae import plot_reconstruction, reconstruction

    _check_model(args.run_dir, ("multvae",), "reconstruction")
    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    run, titles = _load(args)
    rec = reconstruction(run.model, run.split, args.user, args.stage, titles, top=args.top)
    path = plot_reconstruction(rec, _out(args) / f"reconstruction_user{_safe(args.user)}.png", top=args.top)
    order = rec.probs.argsort()[::-1][:args.top]
    table = Table(title=f"user {rec.user}: top {len(order)} of the reconstruction ({rec.stage} input)")
    for col in ("rank", "item", "probability", "in"):
        table.add_column(col)
    inputs, targets = set(rec.inputs.tolist()), set(rec.targets.tolist())
    for r, i in enumerate(order, 1):
        table.add_row(str(r), rec.labels.get(int(i), str(i)), f"{rec.probs[i]:.4f}",
                      "held out" if i in targets else "input" if i in inputs else "")
    console.print(table)
    console.print(f"wrote {path}")
    return 0


def cmd_similar(args: argparse.Namespace) -> int:
    import pandas as pd

    from fishertune.recsys.viz._common import item_labels, lookup_id, py
    from fishertune.recsys.viz.vae import plot_similar_items, similar_items
    from fishertune.utils.io import atomic_write

    _check_model(args.run_dir, ("multvae", "multdae", "sasrec", "bert4rec"), "similar")
    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    run, titles = _load(args)
    item = lookup_id(run.split.item_ids, args.item, "item")
    idx, sims = similar_items(run.model, item, args.top_k + 1)
    if item in idx:  # the item itself first, then its neighbours
        keep = idx != item
        idx, sims = idx[keep][:args.top_k], sims[keep][:args.top_k]
    labels = item_labels(run.split, idx, titles, width=60)
    out = _out(args)
    frame = pd.DataFrame({"rank": range(1, len(idx) + 1),
                          "item": [py(x) for x in run.split.item_ids.to_original(idx)],
                          "title": [titles.get(py(x), "") for x in run.split.item_ids.to_original(idx)],
                          "cosine": sims})
    csv = atomic_write(out / f"similar_item{_safe(args.item)}.csv", lambda p: frame.to_csv(p, index=False))
    import numpy as np

    png = plot_similar_items(run.model, run.split, np.concatenate([[item], idx]),
                             out / f"similar_item{_safe(args.item)}.png", titles)
    table = Table(title=f"items most similar to {item_labels(run.split, [item], titles, width=60)[0]}")
    for col in ("rank", "item", "cosine"):
        table.add_column(col)
    for r, (lab, s) in enumerate(zip(labels, sims), 1):
        table.add_row(str(r), lab, f"{s:.3f}")
    console.print(table)
    console.print(f"wrote {csv} and {png}")
    return 0


def cmd_curves(args: argparse.Namespace) -> int:
    from fishertune.recsys.viz.curves import plot_curves

    path = plot_curves(args.run_dir, _out(args) / "curves.png")
    console.print(f"wrote {path}")
    return 0
