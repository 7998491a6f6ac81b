"""Importance tables and the compression comparison behind ``fishertune importance`` / ``compress``.

:func:`compare_plans` scores a task's blocks with several methods, makes a plan per method and target
(removed-block count or ratio), evaluates every distinct plan once on the evaluation data, times it
against the dense model, and writes ``results.csv`` / ``results.md`` (one row per method and target),
``summary.md`` (metric kept per method, ``random`` as mean ± std over its draws), the plans as JSON and
the figures.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fishertune.layers.analysers import Importance, analyse
from fishertune.layers.blocks import count_parameters
from fishertune.layers.plan import CompressionPlan, blocks_to_remove, measure
from fishertune.layers.task import LayerTask
from fishertune.utils.io import atomic_write_json, atomic_write_text
from fishertune.utils.progress import track

DEFAULT_METHODS = ("fisher_sum", "fisher_mean", "gate_fisher", "gate_taylor", "grad_norm", "taylor", "ablation",
                   "greedy", "block_influence", "angular", "last")


def expand_methods(methods: Sequence[str], random_draws: int) -> list[str]:
    out = [m for m in methods if m.split(":")[0] != "random"]
    out += [m for m in methods if m.split(":")[0] == "random" and ":" in m]
    out += [f"random:{s}" for s in range(random_draws)]
    return list(dict.fromkeys(out))


def scores_frame(results: dict[str, Importance]) -> pd.DataFrame:
    """Blocks x methods table of scores (higher = more important)."""
    first = next(iter(results.values()))
    return pd.DataFrame({m: [r.scores[b] for b in first.blocks] for m, r in results.items()},
                        index=pd.Index(first.blocks, name="block"))


def write_importance(results: dict[str, Importance], out: str | Path, task: LayerTask | None = None) -> pd.DataFrame:
    """``importance.json``, ``scores.csv``, ``scores.md`` and ``scores.png`` under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frame = scores_frame(results)
    atomic_write_json(out / "importance.json", {"spec": task.spec if task else "", "info": task.info if task else {},
                                                "results": {m: r.to_json() for m, r in results.items()}})
    atomic_write_text(out / "scores.csv", frame.to_csv())
    lines = ["| block | " + " | ".join(frame.columns) + " |", "|---" * (len(frame.columns) + 1) + "|"]
    for b, row in frame.iterrows():
        lines.append(f"| {b} | " + " | ".join(f"{v:.4g}" for v in row) + " |")
    lines += ["", "| method | cost (passes over calibration data) | seconds |", "|---|---|---:|"]
    lines += [f"| {m} | {r.cost} | {r.seconds:.1f} |" for m, r in results.items()]
    atomic_write_text(out / "scores.md", "\n".join(lines) + "\n")
    from fishertune.layers.plots import plot_scores

    plot_scores(frame, out / "scores.png")
    return frame


def _targets(n: int, counts: Sequence[int] | None, ratios: Sequence[float] | None, by: str) -> list[dict[str, Any]]:
    if counts:
        bad = [k for k in counts if not 0 <= k <= n]
        if bad:
            raise ValueError(f"cannot remove {bad} of {n} blocks")
        return [{"count": int(k)} for k in counts]
    if ratios:
        return [{"ratio": float(r), "by": by} for r in ratios]
    raise ValueError("give block counts (--remove) or ratios (--ratio)")


def compare_plans(task: LayerTask, methods: Sequence[str], *, counts: Sequence[int] | None = None,
                  ratios: Sequence[float] | None = None, by: str = "blocks", random_draws: int = 5,
                  out: str | Path | None = None, latency: bool = True, repeats: int = 20, warmup: int = 3,
                  threads: int | None = 1, latency_device: str | None = None, kind: str = "empirical",
                  save_weights: bool = False,
                  options: dict[str, dict[str, Any]] | None = None) -> pd.DataFrame:
    """One row per (method, target): blocks removed, parameter ratio, metric, kept, latency speed-up."""
    if task.eval_metric is None:
        raise ValueError("the task has no eval_metric: nothing to measure the plans with")
    methods = expand_methods(methods, random_draws)
    n = len(task.blocks)
    targets = _targets(n, counts, ratios, by)
    opts = dict(options or {})
    if "greedy" in methods and "greedy" not in opts:
        # greedy only needs to go as far as the largest plan
        need = max((t["count"] for t in targets if "count" in t), default=n - 1)
        if ratios:
            need = n - 1 if by == "params" else max(blocks_to_remove(n, r) for r in ratios)
        opts["greedy"] = {"max_remove": max(1, min(need, n))}
    results = analyse(task, methods, kind=kind, options=opts)
    if out is not None:
        write_importance(results, out, task)
    dense = task.model
    dense_metric = float(task.eval_metric(dense))
    cache: dict[tuple[str, ...], dict[str, float]] = {}
    rows = []
    plans = {}
    jobs = [(m, t) for t in targets for m in methods]
    for method, target in track(jobs, "plans", total=len(jobs)):
        plan = CompressionPlan.from_importance(results[method], dense, blocks=task.blocks, spec=task.spec,
                                               block_spec=list(task.block_names) if task.block_names else None,
                                               **target)
        key = tuple(plan.remove)
        if key not in cache:
            small = plan.apply(dense)
            cache[key] = measure(dense, small, metric=task.eval_metric, dense_metric=dense_metric,
                                 latency_inputs=task.latency_inputs if latency else None, repeats=repeats,
                                 warmup=warmup, threads=threads, latency_device=latency_device)
            if out is not None and save_weights:
                plan.save(Path(out) / "plans" / _slug(method, target), small, overwrite=True)
            del small
        if out is not None and not save_weights:
            plans[f"{method} {_slug(method, target)}"] = plan.to_json()
        m = cache[key]
        rows.append({"method": method, "target": _target_text(target), "removed": len(plan.remove),
                     "blocks_ratio": n / max(n - len(plan.remove), 1), "params_ratio": m["params_ratio"],
                     "metric": m["metric"], "kept": m["kept"], "speedup": m.get("speedup", float("nan")),
                     "dense_s": m.get("dense_s", float("nan")), "compressed_s": m.get("compressed_s", float("nan")),
                     "bytes_saved": m["bytes_saved"], "latency_device": m.get("latency_device", ""),
                     "remove": " ".join(plan.remove)})
    frame = pd.DataFrame(rows)
    frame.attrs.update({"dense_metric": dense_metric, "metric_name": task.metric_name,
                        "params_dense": count_parameters(dense)})
    if out is not None:
        _write_compare(frame, results, task, Path(out), plans)
    return frame


def _slug(method: str, target: dict[str, Any]) -> str:
    t = f"k{target['count']}" if "count" in target else f"r{target['ratio']:g}{target['by'][0]}"
    return f"{method.replace(':', '-')}_{t}"


def _target_text(target: dict[str, Any]) -> str:
    return f"-{target['count']}" if "count" in target else f"{target['ratio']:g}x {target['by']}"


def summary_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Methods x targets table of the metric kept; ``random`` draws as mean ± std."""
    f = frame.copy()
    f["group"] = f["method"].str.split(":").str[0]
    cols = list(dict.fromkeys(f["target"]))
    out = {}
    for g, sub in f.groupby("group", sort=False):
        row = {}
        for t in cols:
            vals = sub.loc[sub["target"] == t, "kept"].tolist()
            if len(vals) > 1:
                row[t] = f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f} ({len(vals)} draws)"
            elif vals:
                row[t] = f"{vals[0]:.4f}"
        out[g] = row
    return pd.DataFrame(out).T[cols]


def _write_compare(frame: pd.DataFrame, results: dict[str, Importance], task: LayerTask, out: Path,
                   plans: dict[str, Any]) -> None:
    atomic_write_text(out / "results.csv", frame.to_csv(index=False))
    name = task.metric_name
    head = (f"# {task.spec}: {name} kept after removing blocks\n\n"
            f"dense {name}: {frame.attrs['dense_metric']:.4f}; calibration: {task.info.get('calib', '?')}; "
            f"evaluation: {task.info.get('eval', '?')}; latency: {task.info.get('latency', 'task.latency_inputs')} "
            f"(median of repeats, CPU threads fixed)\n\n")
    cols = ["method", "target", "removed", "params_ratio", "metric", "kept", "speedup", "remove"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in frame.iterrows():
        lines.append("| " + " | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    summ = summary_frame(frame)
    s_lines = ["| method | " + " | ".join(summ.columns) + " |", "|---" * (len(summ.columns) + 1) + "|"]
    s_lines += [f"| {m} | " + " | ".join(str(v) for v in row) + " |" for m, row in summ.iterrows()]
    costs = ["| method | cost | seconds |", "|---|---|---:|"]
    costs += [f"| {m} | {r.cost} | {r.seconds:.1f} |" for m, r in results.items()]
    atomic_write_text(out / "results.md", head + "\n".join(lines) + "\n")
    atomic_write_text(out / "summary.md", head + "## metric kept (compressed / dense)\n\n" + "\n".join(s_lines)
                      + "\n\n## analyser cost\n\n" + "\n".join(costs) + "\n")
    if plans:
        atomic_write_json(out / "plans.json", plans)
    from fishertune.layers.plots import plot_kept

    plot_kept(frame, out / "kept.png", title=f"{task.spec}: {name} kept")
    atomic_write_text(out / "meta.json", json.dumps({"spec": task.spec, "info": task.info, **{
        k: v for k, v in frame.attrs.items()}}, indent=2, default=str))
