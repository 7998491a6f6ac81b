"""``fishertune report RESULTS --out DIR``: the FisherTune experiment report (see
:mod:`fishertune.recsys.cdr.report`). Kept import-light: the parser is built on every command."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add the ``report`` command to an argparse subparsers object."""
    p = subparsers.add_parser(
        "report", help="markdown + self-contained HTML report of FisherTune experiment results")
    p.add_argument("results", nargs="+", help="results file(s) of 'fishertune experiments run' (.jsonl or .parquet)")
    p.add_argument("--out", required=True, help="output folder (report.md, report.html, PNGs, CSVs)")
    p.add_argument("--baseline", default="baseline", help="preset the others are compared with (default: baseline)")
    p.add_argument("--metric", default="NDCG@10", help="primary test metric (default: NDCG@10)")
    p.add_argument("--title", default="FisherTune experiments")
    p.add_argument("--budgets", default=None, metavar="E,E,...",
                   help="epoch budgets of the equal-budget validation table (default: 1/4, 2/4, 3/4 of the longest run)")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from fishertune.cli import console
    from fishertune.recsys.cdr.report import load_results, print_summary, write_report

    rows = load_results(args.results)
    budgets = None
    if args.budgets:
        try:
            budgets = [int(e) for e in args.budgets.split(",") if e.strip()]
        except ValueError:
            raise ValueError(f"--budgets must be comma-separated epoch numbers, got {args.budgets!r}") from None
        if any(e < 1 for e in budgets):
            raise ValueError(f"--budgets must be epochs >= 1, got {args.budgets!r}")
    path = write_report(rows, args.out, baseline=args.baseline, metric=args.metric, title=args.title,
                        source=", ".join(args.results), budgets=budgets)
    print_summary(rows, console=console, baseline=args.baseline)
    console.print(f"report: {path}  and  {path.with_suffix('.html')}")
    return 0
