"""``fishertune finetune CONFIG --strategy NAME [--compare all] [key=value ...] [--out DIR]``."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_finetune(args: argparse.Namespace) -> int:
    from fishertune.cli import _new_run_dir, console
    from fishertune.config import ConfigError, load_config
    from fishertune.tune.finetune import FinetuneConfig, run_comparison

    cfg = load_config(FinetuneConfig, args.config, [*args.overrides, *args.late_overrides])
    if args.compare is None and not args.strategy:
        raise ConfigError("give --strategy NAME (repeatable or comma-separated) or --compare all")
    if args.compare is not None and args.compare != "all":
        raise ConfigError(f"--compare takes 'all', got {args.compare!r}")
    names = None
    if args.strategy:
        names = [n for s in args.strategy for n in s.split(",") if n]
    out = Path(args.out) if args.out else _new_run_dir(cfg.output_dir, cfg.name)
    console.print(f"fine-tune comparison directory: {out}  (re-run with --out {out} to resume)")
    only = None
    if args.draws:
        try:
            only = [int(d) for d in str(args.draws).split(",") if d.strip()]
        except ValueError:
            raise ConfigError(f"--draws takes comma-separated integers, got {args.draws!r}") from None
    summary = run_comparison(cfg, out, names, log=lambda s: console.print(s, markup=False, highlight=False),
                             only_draws=only)
    console.print((out / "summary.md").read_text(), markup=False, highlight=False)
    console.print(f"table: {out / 'summary.md'} (.csv, .json); plot: {out / 'accuracy_vs_params.png'}")
    return 0 if summary else 1


class _Split(argparse.Action):
    """Option values with ``key=value`` overrides allowed after them (``--compare all device=cuda``):
    tokens containing '=' go to the overrides, the rest to the option."""

    def __call__(self, parser, namespace, values, option_string=None):
        vals = values if isinstance(values, list) else [values]
        extra = [v for v in vals if "=" in v]
        plain = [v for v in vals if "=" not in v]
        namespace.late_overrides = (getattr(namespace, "late_overrides", None) or []) + extra
        if self.dest == "strategy":
            if not plain:
                parser.error("--strategy needs a name")
            namespace.strategy = (namespace.strategy or []) + plain
        elif self.dest == "compare":
            if len(plain) > 1:
                parser.error(f"--compare takes at most one value, got {plain}")
            namespace.compare = plain[0] if plain else "all"
        else:
            if len(plain) != 1:
                parser.error(f"{option_string} takes one value, got {plain}")
            setattr(namespace, self.dest, plain[0])


def register(sub) -> None:
    p = sub.add_parser("finetune", help="small-data fine-tuning strategies compared over few-shot draws")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value (dotted keys, e.g. device=cuda train.epochs=10)")
    p.add_argument("--strategy", nargs="+", action=_Split, help="strategy name(s) from the config or the "
                                                                 "presets (repeatable or comma-separated)")
    p.add_argument("--compare", nargs="*", action=_Split, help="'all' (default): every strategy of the "
                                                                "config (or every preset when it lists none)")
    p.add_argument("--out", nargs="+", action=_Split,
                   help="output directory; an existing one is resumed (finished cells skipped)")
    p.add_argument("--draws", nargs="+", action=_Split, help="run only these draws of data.draws (comma-separated), e.g. one process "
                                   "per draw sharing one --out")
    p.set_defaults(func=cmd_finetune, strategy=None, compare=None, out=None, late_overrides=[], draws=None)
