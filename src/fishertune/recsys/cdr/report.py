"""The FisherTune experiment report: from the results table that ``fishertune experiments run`` appends
to (JSONL, or Parquet), a markdown and a self-contained HTML report plus PNGs and CSVs.

    fishertune report RESULTS.jsonl --out DIR [--baseline baseline] [--metric NDCG@10]

What it shows, per *setting* (task, domain pair, evaluation protocol) and domain:

* test metrics, mean ± sample std (ddof=1) over seeds, per preset (baseline first, best mean bold);
* a paired comparison against the baseline on the seeds both share: mean and std of the difference,
  a two-sided paired t-test p-value, wins / losses (undefined, and said so, when fewer than 2 pairs);
* bar charts with error bars; threshold and active-ratio curves over epochs; validation curves;
  the distribution of the normalised importance (Fisher / DR-FIM) per parameter group;
* which preset is best on validation and which on test (the validation pick is the honest one);
* the best validation metric within equal epoch budgets (fair to runs cut by a time limit);
* time per epoch and its ratio to the baseline.

Every metric is taken as higher-is-better (MRR, NDCG@k, HR@k). :func:`summarise` and
:func:`print_summary` are reused by the experiment runner to print the table at the end of a run.

A results row (one run) needs ``preset``, ``seed``, ``domains`` and ``metrics``
(``{domain: {"test": {metric: value}, "valid": {...}, "test_full": {...}}}``); everything else
(``task``, ``protocol``, ``config``, ``history``, timings, ``fisher_summary``, ``importance_hist``) is
optional and the parts of the report that need it are left out, with a note, when it is absent.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fishertune.recsys.cdr.rows import holdout
from fishertune.recsys.viz._common import new_figure
from fishertune.utils.io import atomic_write_bytes, atomic_write_text

__all__ = [
    "ResultsError",
    "budget_table",
    "default_budgets",
    "fisher_table",
    "load_results",
    "paired_comparison",
    "print_summary",
    "selection_table",
    "summarise",
    "timing_table",
    "validate_rows",
    "write_report",
]

REQUIRED = ("preset", "seed", "domains", "metrics")
REFIT_SUFFIX = " (refit)"  # appended to the preset of a row whose run had no validation hold-out
SETTING = ("task", "domains", "protocol")
PREFERRED_METRICS = ("MRR", "NDCG@10", "HR@1", "HR@10")
COUNT_KEYS = frozenset({"n", "n_users", "n_instances"})  # sizes logged beside the metrics, not metrics
SPLIT_TITLES = {"test": "test (sampled negatives)", "test_full": "test (full ranking)", "valid": "validation"}
_DICT_FIELDS = ("metrics", "config", "fisher_summary", "importance_hist")
_OPTIONAL_TYPES: dict[str, tuple[type, ...]] = {
    "task": (str,), "protocol": (str,), "run_dir": (str,), "config": (Mapping,), "history": (list,),
    "fisher_summary": (Mapping,), "importance_hist": (Mapping,), "best_epoch": (int, float),
    "epochs_run": (int, float), "time_per_epoch_s": (int, float), "fisher_time_s": (int, float),
    "active_ratio": (int, float), "stop_reason": (str,),
}


class ResultsError(ValueError):
    """A results row is malformed (the message names the file, line and field)."""


# -- loading and validation ----------------------------------------------------------------------------


def load_results(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """Read one or more results files (JSONL, one run per line; or Parquet) into validated rows.

    Blank lines are skipped; a line that is not JSON, or a row missing a required field, raises
    :class:`ResultsError` naming the file, the line (Parquet: the row) and the field. Only a torn
    *last* line (a writer killed mid-line) is skipped instead, with a note in the report.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    rows: list[dict[str, Any]] = []
    wheres: list[str] = []
    notes: list[str] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"results file not found: {path}")
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
            for i, rec in enumerate(frame.to_dict("records"), start=1):
                rows.append(_plain(rec))
                wheres.append(f"{path} row {i}")
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        last = max((i for i, line in enumerate(lines, start=1) if line.strip()), default=0)
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                if lineno == last and len(lines) > 1 and not line.rstrip().endswith("}"):
                    notes.append(f"{path} line {lineno}: a torn last line (not valid JSON: {exc.msg}) was skipped")
                    continue
                raise ResultsError(f"{path} line {lineno}: not valid JSON ({exc.msg} at column {exc.colno})") \
                    from None
            if not isinstance(obj, dict):
                raise ResultsError(f"{path} line {lineno}: expected a JSON object, got {type(obj).__name__}")
            rows.append(obj)
            wheres.append(f"{path} line {lineno}")
    out = validate_rows(rows, wheres)
    if out and notes:
        out[0]["_notes"] = [*notes, *out[0]["_notes"]]
    return out


def _plain(obj: Any) -> Any:
    """Parquet rows come back with numpy arrays / scalars and JSON-in-strings: make them plain Python."""
    if isinstance(obj, dict):
        out = {k: _plain(v) for k, v in obj.items()}
        for key in _DICT_FIELDS + ("history",):
            if isinstance(out.get(key), str) and out[key][:1] in "{[":
                try:
                    out[key] = json.loads(out[key])
                except json.JSONDecodeError:
                    pass
        return out
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def _is_number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool))


def validate_rows(rows: Iterable[Mapping[str, Any]], wheres: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Check the required fields of each row and normalise it; returns new row dicts.

    Required: ``preset`` (non-empty string), ``seed`` (integer), ``domains`` (non-empty string),
    ``metrics`` (``{domain: {"test": {metric: number}}}``). Optional fields of the wrong type are
    dropped and noted (``row["_notes"]``). Rows already validated pass through unchanged. Of several
    rows with the same preset, seed and setting (a resumed run appended twice) the last is kept, with
    a note naming the dropped ones.
    """
    rows = list(rows)
    out: list[dict[str, Any]] = []
    for i, raw in enumerate(rows):
        where = wheres[i] if wheres is not None else f"row {i + 1}"
        if isinstance(raw, Mapping) and raw.get("_validated"):
            out.append(dict(raw))
            continue
        if not isinstance(raw, Mapping):
            raise ResultsError(f"{where}: expected a mapping, got {type(raw).__name__}")
        row = {k: v for k, v in raw.items() if not (v is None and k in _OPTIONAL_TYPES)}
        for key in REQUIRED:
            if key not in row or row[key] is None:
                raise ResultsError(f"{where}: required field '{key}' is missing (required: {', '.join(REQUIRED)})")
        if not isinstance(row["preset"], str) or not row["preset"]:
            raise ResultsError(f"{where}: field 'preset' must be a non-empty string, got {row['preset']!r}")
        seed = row["seed"]
        if isinstance(seed, float) and seed.is_integer():
            seed = int(seed)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ResultsError(f"{where}: field 'seed' must be an integer, got {row['seed']!r}")
        row["seed"] = int(seed)
        if not isinstance(row["domains"], str) or not row["domains"]:
            raise ResultsError(f"{where}: field 'domains' must be a non-empty string, got {row['domains']!r}")
        metrics = row["metrics"]
        if not isinstance(metrics, Mapping) or not metrics:
            raise ResultsError(f"{where}: field 'metrics' must be a non-empty mapping domain -> splits")
        clean: dict[str, dict[str, dict[str, float]]] = {}
        for domain, splits in metrics.items():
            if splits is None:  # Parquet unions the domains of all rows: another pair's domain is null here
                continue
            if not isinstance(splits, Mapping):
                raise ResultsError(f"{where}: field 'metrics.{domain}' must be a mapping split -> metrics")
            if not isinstance(splits.get("test"), Mapping) or not splits["test"]:
                raise ResultsError(f"{where}: field 'metrics.{domain}.test' is missing or empty "
                                   f"(each domain needs its test metrics)")
            clean[domain] = {}
            for split, values in splits.items():
                if values is None:
                    continue
                if not isinstance(values, Mapping):
                    raise ResultsError(f"{where}: field 'metrics.{domain}.{split}' must be a mapping metric -> value")
                for name, v in values.items():
                    if not _is_number(v):
                        raise ResultsError(f"{where}: field 'metrics.{domain}.{split}.{name}' must be a number, "
                                           f"got {v!r}")
                clean[domain][split] = {k: (math.nan if v is None else float(v)) for k, v in values.items()}
        if not clean:
            raise ResultsError(f"{where}: field 'metrics' has no domain with metrics")
        row["metrics"] = clean
        notes = []
        for key, types in _OPTIONAL_TYPES.items():
            if key in row and (not isinstance(row[key], types) or isinstance(row[key], bool)):
                notes.append(f"{where}: optional field '{key}' has type {type(row[key]).__name__}; ignored")
                del row[key]
        row["task"] = row.get("task", "")
        row["protocol"] = row.get("protocol", "")
        if not holdout(row):
            row["preset"] += REFIT_SUFFIX  # its own preset: never mixed with the held-out runs
        row["_where"] = where
        row["_notes"] = notes
        row["_validated"] = True
        out.append(row)
    def key(row: Mapping[str, Any]) -> tuple:
        return (row["preset"], row["seed"], *(row[k] for k in SETTING))

    def config(row: Mapping[str, Any]) -> str:
        return json.dumps(row.get("config"), sort_keys=True, default=str)

    latest = {key(row): i for i, row in enumerate(out)}
    kept = [row for i, row in enumerate(out) if latest[key(row)] == i]
    dropped = [row for i, row in enumerate(out) if latest[key(row)] != i]
    if kept and dropped:
        other_config = sum(config(row) != config(out[latest[key(row)]]) for row in dropped)
        kept[0]["_notes"] = [*kept[0]["_notes"], (
            f"{len(dropped)} duplicate run(s) (same preset, seed and setting) dropped, the last of each kept"
            + (f"; {other_config} of them had a different config: give each configuration its own preset name"
               if other_config else "") + ": " + ", ".join(row["_where"] for row in dropped[:10]))]
    return kept


# -- tables --------------------------------------------------------------------------------------------


def _order(values: Iterable[str], first: str | None = None) -> list[str]:
    seen: list[str] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    if first is not None and first in seen:
        seen.remove(first)
        seen.insert(0, first)
    return seen


def _metric_order(names: Iterable[str]) -> list[str]:
    names = _order(names)
    return [m for m in PREFERRED_METRICS if m in names] + [m for m in names if m not in PREFERRED_METRICS]


def _index(rows: list[dict[str, Any]], split: str) -> tuple[dict[tuple, dict[int, float]], list[str]]:
    """``{(setting, domain, metric, preset): {seed: value}}`` of one split, and its metric names in order."""
    index: dict[tuple, dict[int, float]] = {}
    names: list[str] = []
    for row in rows:
        setting = tuple(row[k] for k in SETTING)
        for domain, splits in row["metrics"].items():
            for metric, value in splits.get(split, {}).items():
                if metric in COUNT_KEYS:
                    continue
                index.setdefault((setting, domain, metric, row["preset"]), {})[row["seed"]] = value
                if metric not in names:
                    names.append(metric)
    return index, _metric_order(names)


def _std(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def _orders(rows: list[dict[str, Any]], baseline: str) -> tuple[list[tuple], dict[tuple, list[str]], list[str]]:
    settings = _order(tuple(r[k] for k in SETTING) for r in rows)
    domains = {s: _order(d for r in rows if tuple(r[k] for k in SETTING) == s for d in r["metrics"]) for s in settings}
    presets = _order((r["preset"] for r in rows), first=baseline)
    return settings, domains, presets


def summarise(rows: Iterable[Mapping[str, Any]], baseline: str = "baseline", split: str = "test") -> pd.DataFrame:
    """Mean and sample std (ddof=1; NaN for one seed) over seeds of every ``split`` metric.

    One row per setting (task, domains, protocol) x domain x preset, baseline first, other presets in
    the order they first appear; columns ``task, domains, protocol, split, domain, preset, n, seeds``
    then ``<metric>_mean`` / ``<metric>_std`` per metric (MRR, NDCG@10, HR@1, HR@10 first).
    """
    rows = validate_rows(rows)
    settings, domains, presets = _orders(rows, baseline)
    index, metrics = _index(rows, split)
    out = []
    for s in settings:
        for d in domains[s]:
            for p in presets:
                cells = {m: index.get((s, d, m, p), {}) for m in metrics}
                seeds = sorted({k for c in cells.values() for k in c})
                if not seeds:
                    continue
                rec: dict[str, Any] = {"task": s[0], "domains": s[1], "protocol": s[2], "split": split,
                                       "domain": d, "preset": p, "n": len(seeds), "seeds": " ".join(map(str, seeds))}
                for m in metrics:
                    rec[f"{m}_mean"] = _mean(list(cells[m].values()))
                    rec[f"{m}_std"] = _std(list(cells[m].values()))
                out.append(rec)
    cols = [*SETTING, "split", "domain", "preset", "n", "seeds"] + [f"{m}_{s}" for m in metrics for s in ("mean", "std")]
    return pd.DataFrame(out, columns=cols)


def summary_metrics(frame: pd.DataFrame) -> list[str]:
    """The metric names of a :func:`summarise` frame, in column order."""
    return [c[: -len("_mean")] for c in frame.columns if c.endswith("_mean")]


def paired_comparison(rows: Iterable[Mapping[str, Any]], baseline: str = "baseline", split: str = "test",
                      metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Preset minus baseline on the seeds both have, per setting x domain x metric x preset.

    Columns: ``n`` (shared seeds), ``mean_diff``, ``std_diff`` (ddof=1), ``rel_diff`` (mean_diff / the
    baseline's mean on those seeds), ``t``, ``p_value`` (two-sided paired t-test, scipy), ``wins``,
    ``losses``, ``ties`` and ``note`` saying why a statistic is undefined (n < 2, equal differences,
    no baseline runs). Empty when the baseline preset has no runs at all.
    """
    from scipy import stats

    rows = validate_rows(rows)
    settings, domains, presets = _orders(rows, baseline)
    index, names = _index(rows, split)
    metrics = list(metrics) if metrics is not None else names
    cols = [*SETTING, "split", "domain", "metric", "preset", "n", "seeds", "mean_diff", "std_diff", "rel_diff",
            "t", "p_value", "wins", "losses", "ties", "note"]
    if baseline not in presets:
        return pd.DataFrame([], columns=cols)
    out = []
    for s in settings:
        for d in domains[s]:
            for m in metrics:
                base = {k: v for k, v in index.get((s, d, m, baseline), {}).items() if not math.isnan(v)}
                for p in presets:
                    if p == baseline:
                        continue
                    other = {k: v for k, v in index.get((s, d, m, p), {}).items() if not math.isnan(v)}
                    if not other:
                        continue
                    shared = sorted(set(base) & set(other))
                    diff = np.array([other[k] - base[k] for k in shared], dtype=float)
                    rec: dict[str, Any] = {"task": s[0], "domains": s[1], "protocol": s[2], "split": split,
                                           "domain": d, "metric": m, "preset": p, "n": len(shared),
                                           "seeds": " ".join(map(str, shared)), "mean_diff": math.nan,
                                           "std_diff": math.nan, "rel_diff": math.nan, "t": math.nan,
                                           "p_value": math.nan, "wins": int((diff > 0).sum()),
                                           "losses": int((diff < 0).sum()), "ties": int((diff == 0).sum()),
                                           "note": ""}
                    if not base:
                        rec["note"] = f"no {baseline} runs for this setting and domain"
                    elif not shared:
                        rec["note"] = f"no seed in common with {baseline}"
                    else:
                        rec["mean_diff"] = float(diff.mean())
                        base_mean = float(np.mean([base[k] for k in shared]))
                        rec["rel_diff"] = rec["mean_diff"] / base_mean if base_mean != 0 else math.nan
                        if len(shared) < 2:
                            rec["note"] = "n=1 shared seed: std and paired t-test undefined"
                        else:
                            rec["std_diff"] = float(diff.std(ddof=1))
                            scale = max(abs(v) for v in [*other.values(), *base.values()])
                            if rec["std_diff"] <= 1e-12 * max(scale, 1e-300):  # equal up to rounding
                                rec["note"] = "every seed differs by the same amount: t-test undefined"
                            else:
                                res = stats.ttest_rel([other[k] for k in shared], [base[k] for k in shared])
                                rec["t"], rec["p_value"] = float(res.statistic), float(res.pvalue)
                    out.append(rec)
    return pd.DataFrame(out, columns=cols)


def selection_table(rows: Iterable[Mapping[str, Any]], metric: str = "NDCG@10") -> pd.DataFrame:
    """Per setting and domain (and ``(mean)`` over the pair's domains): the preset best on validation
    ``metric`` (mean over seeds) and the preset best on test, with both of their test means."""
    rows = validate_rows(rows)
    settings, domains, presets = _orders(rows, None)
    valid, test = _index(rows, "valid")[0], _index(rows, "test")[0]
    out = []
    for s in settings:
        per: dict[str, dict[str, tuple[float, float]]] = {}
        for d in domains[s]:
            per[d] = {}
            for p in presets:
                v = _mean(list(valid.get((s, d, metric, p), {}).values()))
                t = _mean(list(test.get((s, d, metric, p), {}).values()))
                if not (math.isnan(v) and math.isnan(t)):
                    per[d][p] = (v, t)
        avg: dict[str, tuple[float, float]] = {}
        for p in presets:
            if all(p in per[d] for d in domains[s]):
                avg[p] = (_mean([per[d][p][0] for d in domains[s]]) if all(
                    not math.isnan(per[d][p][0]) for d in domains[s]) else math.nan,
                          _mean([per[d][p][1] for d in domains[s]]))
        for d, cand in [*per.items(), ("(mean)", avg)] if len(domains[s]) > 1 else per.items():
            have_v = {p: vt for p, vt in cand.items() if not math.isnan(vt[0])}
            have_t = {p: vt for p, vt in cand.items() if not math.isnan(vt[1])}
            rec: dict[str, Any] = {"task": s[0], "domains": s[1], "protocol": s[2], "domain": d, "metric": metric,
                                   "best_on_valid": None, "valid_pick_valid": math.nan, "valid_pick_test": math.nan,
                                   "best_on_test": None, "test_pick_test": math.nan, "agree": False}
            if have_v:
                bv = max(have_v, key=lambda p: have_v[p][0])
                rec.update(best_on_valid=bv, valid_pick_valid=have_v[bv][0], valid_pick_test=have_v[bv][1])
            if have_t:
                bt = max(have_t, key=lambda p: have_t[p][1])
                rec.update(best_on_test=bt, test_pick_test=have_t[bt][1])
            rec["agree"] = rec["best_on_valid"] is not None and rec["best_on_valid"] == rec["best_on_test"]
            out.append(rec)
    return pd.DataFrame(out, columns=[*SETTING, "domain", "metric", "best_on_valid", "valid_pick_valid",
                                      "valid_pick_test", "best_on_test", "test_pick_test", "agree"])


def _valid_by_epoch(row: Mapping[str, Any], metric: str) -> dict[int, dict[str, float]]:
    """Epoch -> domain -> validation ``metric``, from the row's ``history`` (entries without it skipped)."""
    out: dict[int, dict[str, float]] = {}
    for rec in row.get("history") or []:
        v = rec.get("valid") if isinstance(rec, Mapping) else None
        if not isinstance(v, Mapping) or not _is_number(rec.get("epoch")) or rec.get("epoch") is None:
            continue
        vals = {d: float(m[metric]) for d, m in v.items() if isinstance(m, Mapping) and _is_number(m.get(metric))
                and m.get(metric) is not None}
        if vals:
            out[int(rec["epoch"])] = vals
    return out


def _valid_means(row: Mapping[str, Any], metric: str) -> dict[int, float]:
    """Epoch -> validation ``metric`` averaged over the domains logged at that epoch."""
    return {e: sum(v.values()) / len(v) for e, v in _valid_by_epoch(row, metric).items()}


def _spaced(longest: int, n: int = 3) -> list[int]:
    return sorted({max(1, round(longest * k / (n + 1))) for k in range(1, n + 1)}) if longest else []


def default_budgets(rows: Iterable[Mapping[str, Any]], metric: str = "NDCG@10", n: int = 3) -> list[int]:
    """``n`` epoch budgets evenly spaced up to the longest logged history (1/4, 2/4, 3/4 of it for n=3)."""
    return _spaced(max((max(_valid_means(r, metric), default=0) for r in rows), default=0), n)


def budget_table(rows: Iterable[Mapping[str, Any]], metric: str = "NDCG@10",
                 budgets: Sequence[int] | None = None, baseline: str = "baseline") -> pd.DataFrame:
    """Per setting, preset and epoch budget E: the best validation ``metric`` (mean over the pair's
    domains) within the first E epochs, mean and std over seeds. It compares presets fairly when some
    runs were cut by a time limit: a run counts at E when it logged epoch E, or when it ended before E
    for another reason than ``time_limit`` (early stopping: its best is final); ``n`` says how many
    counted. Only ``preset``, ``seed``, ``domains`` and ``history`` are read (rows of runs killed before
    their test pass work too)."""
    rows = [r for r in rows if isinstance(r, Mapping)]
    means = [_valid_means(r, metric) for r in rows]  # each history read once
    budgets = sorted(set(budgets)) if budgets else _spaced(max((max(c, default=0) for c in means), default=0))
    out = []
    settings = [tuple(r.get(k, "") for k in SETTING) for r in rows]  # task / protocol may be absent here
    for s in _order(settings):
        mine = [(r, c) for r, c, rs in zip(rows, means, settings) if rs == s]
        for p in _order((r["preset"] for r, _ in mine), baseline):
            curves = [(c, r.get("stop_reason")) for r, c in mine if r["preset"] == p and c]
            for e in budgets:
                best = [max(v for k, v in c.items() if k <= e) for c, why in curves
                        if min(c) <= e and (max(c) >= e or why not in (None, "time_limit"))]
                out.append({"task": s[0], "domains": s[1], "protocol": s[2], "preset": p, "budget": e,
                            "n": len(best), "runs": len(curves), "mean": _mean(best), "std": _std(best)})
    return pd.DataFrame(out, columns=[*SETTING, "preset", "budget", "n", "runs", "mean", "std"])


def timing_table(rows: Iterable[Mapping[str, Any]], baseline: str = "baseline") -> pd.DataFrame:
    """Per setting and preset: time per epoch (mean, std over seeds) and its ratio to the baseline's
    mean in the same setting, Fisher time, epochs run, best epoch and final active ratio (means)."""
    rows = validate_rows(rows)
    settings, _, presets = _orders(rows, baseline)
    keys = ("time_per_epoch_s", "fisher_time_s", "epochs_run", "best_epoch", "active_ratio")
    out = []
    for s in settings:
        base_t = math.nan
        for p in presets:
            sel = [r for r in rows if tuple(r[k] for k in SETTING) == s and r["preset"] == p]
            if not sel:
                continue
            vals = {k: [float(r[k]) for r in sel if k in r] for k in keys}
            rec: dict[str, Any] = {"task": s[0], "domains": s[1], "protocol": s[2], "preset": p, "n": len(sel)}
            rec["time_per_epoch_s_mean"] = _mean(vals["time_per_epoch_s"])
            rec["time_per_epoch_s_std"] = _std(vals["time_per_epoch_s"])
            if p == baseline:
                base_t = rec["time_per_epoch_s_mean"]
            rec["ratio_to_baseline"] = (rec["time_per_epoch_s_mean"] / base_t
                                        if base_t and not math.isnan(base_t) else math.nan)
            for k in keys[1:]:
                rec[f"{k}_mean"] = _mean(vals[k])
            reasons = Counter(r["stop_reason"] for r in sel if r.get("stop_reason"))
            rec["stopped"] = ", ".join(f"{reasons[x]} {x}" for x in sorted(reasons))
            out.append(rec)
    return pd.DataFrame(out, columns=[*SETTING, "preset", "n", "time_per_epoch_s_mean", "time_per_epoch_s_std",
                                      "ratio_to_baseline", *(f"{k}_mean" for k in keys[1:]), "stopped"])


_STAT = re.compile(r"^(?:(.*)_)?(mean|max|min|std|q\d+(?:\.\d+)?)$")
_QUANTITY_ORDER = ("fisher", "fisher_perturbed", "drfim", "drfim_extra", "drfim_extra / drfim", "drfim / fisher")


def _fisher_entry(entry: Mapping[str, Any]) -> dict[tuple[str, str], float]:
    """``{(quantity, stat): value}`` of one group's ``fisher_summary``, in either logged shape:
    flat (``fisher_mean``, ``drfim_q50``, ``scale``, ...) or nested (``quantiles: {q10: ...}``)."""
    out: dict[tuple[str, str], float] = {}

    def put(key: str, v: Any, nested: str | None = None) -> None:
        if v is None or not _is_number(v):
            return
        m = _STAT.match(key)
        quantity, stat = (m.group(1) or nested or "quantiles", m.group(2)) if m else (key, "value")
        out[(quantity, stat)] = float(v)

    for k, v in entry.items():
        if isinstance(v, Mapping):
            for k2, v2 in v.items():
                put(k2, v2, nested=None if k == "quantiles" else k)
        else:
            put(k, v)
    return out


def fisher_table(rows: Iterable[Mapping[str, Any]], baseline: str = "baseline") -> pd.DataFrame:
    """Per setting, preset, parameter group and logged quantity (fisher, fisher_perturbed, drfim,
    drfim_extra, ...): means over seeds of each logged statistic of ``fisher_summary`` (mean, q10,
    q50, q90, q99, max, ...). Added rows: ``drfim_extra / drfim`` (the share of DR-FIM that its
    domain-shift term makes, ratio of the means) when both are logged, else ``drfim / fisher`` when
    no ``scale`` is logged (a logged scale means DR-FIM was computed on the rescaled Fisher)."""
    rows = validate_rows(rows)
    settings, _, presets = _orders(rows, baseline)
    recs = []
    stats_seen: list[str] = []
    for s in settings:
        for p in presets:
            sel = [r["fisher_summary"] for r in rows if tuple(r[k] for k in SETTING) == s and r["preset"] == p
                   and isinstance(r.get("fisher_summary"), Mapping)]
            for g in _order(g for fs in sel for g in fs if isinstance(fs[g], Mapping)):
                entries = [_fisher_entry(fs[g]) for fs in sel if isinstance(fs.get(g), Mapping)]
                group_recs: list[dict[str, Any]] = []
                means: dict[str, float] = {}
                for q in _order(q for e in entries for q, _ in e):
                    rec: dict[str, Any] = {"task": s[0], "domains": s[1], "protocol": s[2], "preset": p, "group": g,
                                           "quantity": q, "n": sum(any(k[0] == q for k in e) for e in entries)}
                    for st in _order(k[1] for e in entries for k in e if k[0] == q):
                        rec[st] = _mean([e[(q, st)] for e in entries if (q, st) in e])
                        stats_seen = _order([*stats_seen, st])
                    means[q] = rec.get("mean", math.nan)
                    group_recs.append(rec)
                if "drfim_extra" in means and "drfim" in means:
                    num, den = "drfim_extra", "drfim"  # the share of DR-FIM that the domain-shift term makes
                elif "fisher" in means and "drfim" in means and "scale" not in means:
                    num, den = "drfim", "fisher"  # only when both are on the same scale
                else:
                    num = den = ""
                if num:
                    group_recs.append({"task": s[0], "domains": s[1], "protocol": s[2], "preset": p, "group": g,
                                       "quantity": f"{num} / {den}", "n": len(entries),
                                       "mean": means[num] / means[den] if means[den] else math.nan})
                group_recs.sort(key=lambda r: _QUANTITY_ORDER.index(r["quantity"])
                                if r["quantity"] in _QUANTITY_ORDER else len(_QUANTITY_ORDER))  # stable
                recs += group_recs
    stats_seen = sorted(stats_seen, key=lambda st: (0, 0) if st == "mean" else (
        (1, _quantile_level(st)) if st.startswith("q") else (2, 0) if st in ("min", "max", "std") else (3, 0)))
    return pd.DataFrame(recs, columns=[*SETTING, "preset", "group", "quantity", "n", *stats_seen])


def _quantile_level(name: str) -> float:
    m = re.search(r"[\d.]+", name)
    return float(m.group()) if m else math.inf


# -- terminal ------------------------------------------------------------------------------------------


def _fmt(v: float, digits: int = 4) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _mean_std(mean: float, std: float, n: int, digits: int = 4) -> str:
    if isinstance(mean, float) and math.isnan(mean):
        return "–"
    return _fmt(mean, digits) if n < 2 or math.isnan(std) else f"{_fmt(mean, digits)} ± {_fmt(std, digits)}"


def _setting_name(task: str, domains: str, protocol: str) -> str:
    parts = [x for x in (task, domains) if x]
    name = " ".join(parts)
    return f"{name} [{protocol}]" if protocol and protocol != "sampled" else name


def _labeller(settings: Iterable[tuple[str, str, str]]):
    """Short table labels for settings: the domain pair, plus task / protocol only where they vary."""
    settings = list(settings)
    vary_task = len({s[0] for s in settings}) > 1
    vary_protocol = len({s[2] for s in settings}) > 1

    def label(task: str, domains: str, protocol: str) -> str:
        name = f"{task} {domains}" if vary_task and task else domains
        return f"{name} [{protocol}]" if vary_protocol and protocol else name

    return label


def _round_key(v: float, digits: int = 4) -> float:
    return round(float(v), digits)


def _best_flags(frame: pd.DataFrame, metrics: Sequence[str], by: Sequence[str]) -> set[tuple[int, str]]:
    """(row position, metric) of the best mean per metric within each ``by`` group (ties all bold)."""
    best: set[tuple[int, str]] = set()
    frame = frame.reset_index(drop=True)
    for _, grp in frame.groupby(list(by), sort=False):
        if len(grp) < 2:
            continue
        for m in metrics:
            col = grp[f"{m}_mean"].dropna().map(_round_key)  # ties as displayed (4 decimals) are all bold
            if len(col):
                best.update((int(i), m) for i in col.index[col == col.max()])
    return best


def _headline_metrics(available: Sequence[str], extra: str | None = None) -> list[str]:
    """The metrics shown where space is short: MRR, NDCG@10, HR@1, HR@10 (and ``extra``) when present."""
    chosen = [m for m in available if m in PREFERRED_METRICS or m == extra]
    return chosen or list(available)


def print_summary(rows: Iterable[Mapping[str, Any]], console: Any = None, baseline: str = "baseline",
                  split: str = "test", metrics: Sequence[str] | None = None, title: str | None = None) -> pd.DataFrame:
    """Print the :func:`summarise` table with rich (best mean per setting and domain in bold); returns
    the full frame. ``metrics`` defaults to MRR, NDCG@10, HR@1, HR@10 (those present)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    frame = summarise(rows, baseline=baseline, split=split)
    available = summary_metrics(frame)
    if metrics is None:
        metrics = _headline_metrics(available)
    else:
        missing = [m for m in metrics if m not in available]
        if missing:
            raise ValueError(f"metrics {missing} are not among the {split} metrics: {', '.join(available)}")
    best = _best_flags(frame, metrics, [*SETTING, "domain"])
    settings = _order(zip(frame["task"], frame["domains"], frame["protocol"]))
    lab = _labeller(settings)
    one = len(settings) == 1
    heading = f"{SPLIT_TITLES.get(split, split)}: mean ± std over seeds"
    table = Table(title=title or (f"{_setting_name(*settings[0])}, {heading}" if one else heading))
    for col in [*([] if one else ["setting"]), "domain", "preset", "n", *metrics]:
        table.add_column(col, justify="left" if col in ("setting", "domain", "preset") else "right")
    for i, r in frame.iterrows():
        cells = [_mean_std(r[f"{m}_mean"], r[f"{m}_std"], r["n"]) for m in metrics]
        cells = [f"[bold]{c}[/]" if (i, m) in best else c for c, m in zip(cells, metrics)]
        head = [] if one else [lab(r["task"], r["domains"], r["protocol"])]
        table.add_row(*head, r["domain"], r["preset"], str(r["n"]), *cells)
    console.print(table)
    return frame


# -- figures -------------------------------------------------------------------------------------------


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})  # margins are set by _layout: "tight" would draw twice
    return buf.getvalue()


def _layout(fig, n_legend: int = 0, xlabel_lines: int = 1, top_in: float = 0.35) -> None:
    """Fixed margins in inches (room for tick labels, an x label and a figure legend of ``n_legend``
    entries in rows of 5 at the bottom)."""
    w, h = fig.get_size_inches()
    legend_in = 0.2 * math.ceil(n_legend / 5) + 0.1 if n_legend else 0.0
    bottom_in = 0.45 + 0.15 * xlabel_lines + legend_in
    fig.subplots_adjust(left=0.75 / w, right=1 - 0.15 / w, top=1 - top_in / h, bottom=bottom_in / h,
                        wspace=0.3, hspace=0.6)


def _colors(presets: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if len(presets) <= 10 else colormaps["tab20"]
    return {p: cmap(i % cmap.N) for i, p in enumerate(presets)}


def _bar_chart(frame: pd.DataFrame, metric: str, presets: Sequence[str], split: str) -> bytes:
    """Grouped bars: one group per setting x domain, one bar per preset, error bars = std over seeds."""
    groups = _order(zip(frame["task"], frame["domains"], frame["protocol"], frame["domain"]))
    colors = _colors(presets)
    width = 0.8 / max(1, len(presets))
    fig = new_figure(max(5.0, 1.1 + len(groups) * (0.35 + 0.22 * len(presets))), 3.6 + 0.2 * math.ceil(len(presets) / 5))
    ax = fig.add_subplot(1, 1, 1)
    for j, p in enumerate(presets):
        xs, ys, es = [], [], []
        for i, g in enumerate(groups):
            sel = frame[(frame["task"] == g[0]) & (frame["domains"] == g[1]) & (frame["protocol"] == g[2])
                        & (frame["domain"] == g[3]) & (frame["preset"] == p)]
            if sel.empty or math.isnan(sel[f"{metric}_mean"].iloc[0]):
                continue
            xs.append(i + (j - (len(presets) - 1) / 2) * width)
            ys.append(sel[f"{metric}_mean"].iloc[0])
            std = sel[f"{metric}_std"].iloc[0]
            es.append(0.0 if math.isnan(std) else std)
        if xs:
            ax.bar(xs, ys, width=width, yerr=es, capsize=2, color=colors[p], label=p, edgecolor="none")
    settings = _order(g[:3] for g in groups)
    lab = _labeller(settings)
    names = [g[3] if len(settings) == 1 else f"{g[3]}\n{lab(*g[:3])}" for g in groups]
    ax.set_xticks(range(len(groups)), names, fontsize=8, rotation=0 if len(groups) <= 6 else 30,
                  ha="center" if len(groups) <= 6 else "right")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric}, {SPLIT_TITLES.get(split, split)}: mean ± std over seeds", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    shown = [p for p in presets if p in set(frame["preset"])]
    _layout(fig, len(shown), xlabel_lines=2 if len(settings) > 1 else 1)
    _figure_legend(fig, colors, shown, {})
    return _png(fig)


def _epoch_means(series: list[dict[int, float]]) -> tuple[list[int], list[float]]:
    """Mean over seeds at each epoch (over the seeds that reached it: early stopping shortens runs)."""
    epochs = sorted({e for s in series for e in s})
    return epochs, [_mean([s[e] for s in series if e in s]) for e in epochs]


def _history_series(rows: list[dict[str, Any]], key: str, group: str) -> list[dict[int, float]]:
    out = []
    for r in rows:
        s: dict[int, float] = {}
        for rec in r.get("history") or []:
            if not isinstance(rec, Mapping) or not _is_number(rec.get("epoch")) or rec.get("epoch") is None:
                continue
            if key == "threshold" and rec.get("phase") in ("warmup", "baseline"):
                continue  # no threshold acts before tuning starts (a logged 0 would mislead)
            val = rec.get(key)
            val = val.get(group) if isinstance(val, Mapping) else None
            if _is_number(val) and val is not None and not math.isnan(float(val)):
                s[int(rec["epoch"])] = float(val)
        if s:
            out.append(s)
    return out


def _integer_epochs(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _figure_legend(fig, colors: Mapping[str, Any], presets: Sequence[str], counts: Mapping[str, int]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[p], lw=3) for p in presets]
    fig.legend(handles, [f"{p} (n={counts[p]})" if counts.get(p) else p for p in presets], loc="lower center",
               ncol=min(5, len(presets)), fontsize=7, frameon=False, bbox_to_anchor=(0.5, 0.0))


def _curves_chart(sel: Sequence[dict[str, Any]], presets: Sequence[str], colors: Mapping[str, Any]) -> bytes | None:
    """Threshold (top row) and active ratio (bottom row) per parameter group (columns), one line per
    preset, mean over seeds; None when nothing was logged."""
    rows = []
    for key, title in (("threshold", "threshold δ(t)"), ("ratio", "active ratio")):
        groups = _order(g for r in sel for rec in r.get("history") or [] if isinstance(rec, Mapping)
                        and isinstance(rec.get(key), Mapping) for g in rec[key])
        panels = []
        for g in groups:
            lines = []
            for p in presets:
                series = _history_series([r for r in sel if r["preset"] == p], key, g)
                if series:
                    lines.append((p, *_epoch_means(series), len(series)))
            if lines:
                panels.append((f"{title}: {g}", lines))
        if panels:
            rows.append(panels)
    if not rows:
        return None
    ncols = max(len(r) for r in rows)
    fig = new_figure(3.6 * ncols, 2.5 * len(rows) + 0.5 + 0.2 * math.ceil(len(presets) / 5))
    shown: list[str] = []
    counts: dict[str, int] = {}
    for i, panels in enumerate(rows):
        for j, (title, lines) in enumerate(panels):
            ax = fig.add_subplot(len(rows), ncols, i * ncols + j + 1)
            for p, xs, ys, n in lines:
                ax.plot(xs, ys, color=colors[p], lw=1.4, marker="o" if len(xs) < 15 else None, ms=2.5)
                shown = _order([*shown, p])
                counts[p] = max(counts.get(p, 0), n)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("epoch", fontsize=8)
            ax.tick_params(labelsize=7)
            _integer_epochs(ax)
            ax.grid(alpha=0.3)
    _layout(fig, len(shown))
    _figure_legend(fig, colors, [p for p in presets if p in shown], counts)
    return _png(fig)


def _valid_chart(sel: Sequence[dict[str, Any]], presets: Sequence[str], domains: Sequence[str], metric: str,
                 colors: Mapping[str, Any]) -> bytes | None:
    """Validation ``metric`` over epochs per domain, mean over seeds; None when not logged."""
    panels = []
    by_row = [(r["preset"], _valid_by_epoch(r, metric)) for r in sel]  # each history read once
    for d in domains:
        lines = []
        for p in presets:
            series = [{e: v[d] for e, v in h.items() if d in v} for preset, h in by_row if preset == p]
            series = [x for x in series if x]
            if series:
                lines.append((p, *_epoch_means(series), len(series)))
        if lines:
            panels.append((d, lines))
    if not panels:
        return None
    fig = new_figure(4.2 * len(panels), 3.2 + 0.2 * math.ceil(len(presets) / 5))
    counts: dict[str, int] = {}
    for k, (d, lines) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for p, xs, ys, n in lines:
            ax.plot(xs, ys, color=colors[p], lw=1.3)
            counts[p] = max(counts.get(p, 0), n)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        _integer_epochs(ax)
        ax.set_title(f"{d}: validation {metric}, mean over seeds", fontsize=9)
        ax.grid(alpha=0.3)
    _layout(fig, len(counts))
    _figure_legend(fig, colors, [p for p in presets if p in counts], counts)
    return _png(fig)


def _hist_chart(sel: Sequence[dict[str, Any]], presets: Sequence[str], colors: Mapping[str, Any]) -> bytes | None:
    """Density of the logged importance histogram per parameter group (one panel each), per preset.

    Seeds with identical bin edges are pooled (counts summed); otherwise each seed is drawn thinly."""
    groups = _order(g for r in sel if isinstance(r.get("importance_hist"), Mapping)
                    for g in r["importance_hist"])
    panels = []
    for g in groups:
        lines = []
        for p in presets:
            hists = []
            for r in sel:
                h = r.get("importance_hist", {}).get(g) if r["preset"] == p else None
                if not isinstance(h, Mapping):
                    continue
                try:
                    edges = np.asarray(h.get("edges"), dtype=float)
                    counts = np.asarray(h.get("counts"), dtype=float)
                except (TypeError, ValueError):
                    continue
                if edges.ndim == 1 and counts.ndim == 1 and len(edges) == len(counts) + 1 and len(counts) > 0:
                    hists.append((edges, counts))
            if not hists:
                continue
            if all(len(e) == len(hists[0][0]) and np.allclose(e, hists[0][0]) for e, _ in hists):
                lines.append((p, [(hists[0][0], sum(c for _, c in hists))], len(hists), True))
            else:
                lines.append((p, hists, len(hists), False))
        if lines:
            panels.append((g, lines))
    if not panels:
        return None
    fig = new_figure(4.2 * len(panels), 3.2 + 0.2 * math.ceil(len(presets) / 5))
    seen: dict[str, int] = {}
    for k, (g, lines) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        all_edges = np.concatenate([e for _, hs, _, _ in lines for e, _ in hs])
        for p, hs, n, pooled in lines:
            seen[p] = max(seen.get(p, 0), n)
            for edges, counts in hs:
                widths = np.diff(edges)
                total = counts.sum()
                dens = counts / (total * np.where(widths > 0, widths, 1.0)) if total > 0 else counts
                ax.stairs(dens, edges, color=colors[p], lw=1.4 if pooled else 0.6)
        if np.all(all_edges > 0) and all_edges.max() / all_edges.min() > 100:
            ax.set_xscale("log")
        ax.set_xlabel("importance (as logged)", fontsize=8)
        ax.set_ylabel("density", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_title(f"group {g}", fontsize=9)
        ax.grid(alpha=0.3)
    _layout(fig, len(seen))
    _figure_legend(fig, colors, [p for p in presets if p in seen], seen)
    return _png(fig)


def _quantile_chart(ft: pd.DataFrame, presets: Sequence[str], colors: Mapping[str, Any]) -> bytes | None:
    """One panel per logged quantity (Fisher, DR-FIM, ...): per group and preset the range of the logged
    quantiles as a bar and the median as a dot, means over seeds. Log scale when the positive values
    span more than two decades (values <= 0 are then drawn at the bottom of the axis)."""
    qcols = [c for c in ft.columns if re.fullmatch(r"q[\d.]+", c)]
    if ft.empty or not qcols:
        return None
    quantities = [q for q in _order(ft["quantity"]) if ft[ft["quantity"] == q][qcols].notna().any().any()]
    if not quantities:
        return None
    groups = _order(ft["group"])
    presets = [p for p in presets if p in set(ft["preset"])]
    mid = min(qcols, key=lambda q: abs(_quantile_level(q) - 50))
    ncols = min(len(quantities), 4)
    nrows = math.ceil(len(quantities) / ncols)
    panel_w = max(2.6, 0.9 + 0.5 * len(groups) * max(1, len(presets)) ** 0.5)
    fig = new_figure(panel_w * ncols + 0.6, 2.7 * nrows + 0.3 + 0.2 * math.ceil(len(presets) / 5))
    width = 0.8 / max(1, len(presets))
    for k, quantity in enumerate(quantities):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        sub = ft[ft["quantity"] == quantity]
        values = [float(v) for v in sub[qcols].to_numpy().ravel() if not math.isnan(v)]
        positive = [v for v in values if v > 0]
        log = bool(positive) and max(positive) / min(positive) > 100
        floor = min(positive) / 3 if log else None
        for j, p in enumerate(presets):
            for i, g in enumerate(groups):
                sel = sub[(sub["preset"] == p) & (sub["group"] == g)]
                if sel.empty:
                    continue
                qs = [float(sel[q].iloc[0]) for q in qcols if not math.isnan(sel[q].iloc[0])]
                if not qs:
                    continue
                if log:
                    qs = [max(v, floor) for v in qs]
                x = i + (j - (len(presets) - 1) / 2) * width
                ax.vlines(x, min(qs), max(qs), color=colors[p], lw=4)
                m = float(sel[mid].iloc[0])
                if not math.isnan(m):
                    ax.plot([x], [max(m, floor) if log else m], "o", color="black", ms=3)
        if log:
            ax.set_yscale("log")
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.set_xticks(range(len(groups)), groups, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_title(quantity, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{qcols[0]}–{qcols[-1]} (bar) and {mid} (dot), mean over seeds", fontsize=9, y=0.995)
    _layout(fig, len(presets), xlabel_lines=0, top_in=0.6)
    _figure_legend(fig, colors, presets, {})
    return _png(fig)


# -- document model: one list of blocks rendered to markdown and to HTML --------------------------------


@dataclass
class _Table:
    headers: list[str]
    rows: list[list[str]]
    bold: set[tuple[int, int]] = field(default_factory=set)
    left: int | set[int] = 1  # left-aligned columns: the first ``left`` ones, or these indices

    def is_left(self, j: int) -> bool:
        return j in self.left if isinstance(self.left, set) else j < self.left


@dataclass
class _Doc:
    blocks: list[tuple[str, Any]] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)

    def h(self, level: int, text: str) -> None:
        self.blocks.append((f"h{level}", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, t: _Table) -> None:
        self.blocks.append(("table", t))

    def img(self, name: str, data: bytes | None, alt: str) -> bool:
        if data is None:
            return False
        self.images[name] = data
        self.blocks.append(("img", (name, alt)))
        return True


def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _render_md(doc: _Doc) -> str:
    out: list[str] = []
    for kind, obj in doc.blocks:
        if kind.startswith("h"):
            out += ["#" * int(kind[1]) + " " + obj, ""]
        elif kind == "p":
            out += [obj, ""]
        elif kind == "table":
            out.append("| " + " | ".join(_md_cell(h) for h in obj.headers) + " |")
            out.append("|" + "".join("---|" if obj.is_left(j) else "---:|" for j in range(len(obj.headers))))
            for i, row in enumerate(obj.rows):
                cells = [f"**{_md_cell(c)}**" if (i, j) in obj.bold and c else _md_cell(c) for j, c in enumerate(row)]
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
        elif kind == "img":
            out += [f"![{obj[1]}]({obj[0]})", ""]
    return "\n".join(out)


def _inline_html(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1150px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #3b6ea8; padding-bottom: .2em; } h2 { margin-top: 1.8em; color: #2a4f7a; }
table { border-collapse: collapse; margin: .8em 0; font-size: 13px; }
th, td { border: 1px solid #ccd; padding: 3px 8px; } th { background: #eef2f8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } tr:nth-child(even) td { background: #fafbfd; }
img { max-width: 100%; display: block; margin: .6em 0; } code { background: #f2f2f2; padding: 0 3px; }
"""


def _render_html(doc: _Doc, title: str) -> str:
    out = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
           f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style></head><body>"]
    for kind, obj in doc.blocks:
        if kind.startswith("h"):
            out.append(f"<{kind}>{_inline_html(obj)}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline_html(obj)}</p>")
        elif kind == "table":
            out.append("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in obj.headers)
                       + "</tr></thead><tbody>")
            for i, row in enumerate(obj.rows):
                cells = []
                for j, c in enumerate(row):
                    inner = html.escape(str(c))
                    if (i, j) in obj.bold and c:
                        inner = f"<b>{inner}</b>"
                    cls = "" if obj.is_left(j) else ' class="num"'
                    cells.append(f"<td{cls}>{inner}</td>")
                out.append("<tr>" + "".join(cells) + "</tr>")
            out.append("</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(doc.images[obj[0]]).decode("ascii")
            out.append(f"<img alt=\"{html.escape(obj[1])}\" src=\"data:image/png;base64,{data}\">")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# -- the report ----------------------------------------------------------------------------------------


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name.replace("@", "_at_")).strip("_") or "x"


def _summary_table(frame: pd.DataFrame, metrics: Sequence[str], lab) -> _Table:
    best = _best_flags(frame, metrics, [*SETTING, "domain"])
    t = _Table(["setting", "domain", "preset", "n", *metrics], [], left=3)
    for i, r in frame.iterrows():
        t.rows.append([lab(r["task"], r["domains"], r["protocol"]), r["domain"], r["preset"], str(r["n"]),
                       *(_mean_std(r[f"{m}_mean"], r[f"{m}_std"], r["n"]) for m in metrics)])
        t.bold.update((i, 4 + k) for k, m in enumerate(metrics) if (i, m) in best)
    return t


def _columns(frame: pd.DataFrame, lab) -> tuple[list[tuple], list[str]]:
    """(task, domains, protocol, domain) columns of the opening tables and their headers."""
    cols = _order(zip(frame["task"], frame["domains"], frame["protocol"], frame["domain"]))
    one_setting = len({c[:3] for c in cols}) == 1
    return cols, [c[3] if one_setting else f"{c[3]} ({lab(*c[:3])})" for c in cols]


def _short_table(frame: pd.DataFrame, metric: str, presets: Sequence[str], timing: pd.DataFrame, lab) -> _Table:
    """Presets as rows, setting x domain as columns, the primary metric (and time per epoch) in cells."""
    cols, headers = _columns(frame, lab)
    t = _Table(["preset", *headers, "s / epoch"], [], left=1)
    best: dict[int, float] = {}
    cells: dict[tuple[str, int], float] = {}
    for p in presets:
        row = [p]
        for j, c in enumerate(cols):
            sel = frame[(frame["task"] == c[0]) & (frame["domains"] == c[1]) & (frame["protocol"] == c[2])
                        & (frame["domain"] == c[3]) & (frame["preset"] == p)]
            if sel.empty:
                row.append("")
                continue
            r = sel.iloc[0]
            row.append(_mean_std(r[f"{metric}_mean"], r[f"{metric}_std"], r["n"])
                       + ("" if r["n"] != 1 else " (n=1)"))
            if not math.isnan(r[f"{metric}_mean"]):
                cells[(p, j)] = _round_key(r[f"{metric}_mean"])
                best[j] = max(best.get(j, -math.inf), cells[(p, j)])
        tt = timing[timing["preset"] == p]["time_per_epoch_s_mean"].dropna()
        row.append(_fmt(float(tt.mean()), 2) if len(tt) else "–")
        t.rows.append(row)
    for i, p in enumerate(presets):
        for j in range(len(cols)):
            contenders = sum((q, j) in cells for q in presets)
            if contenders > 1 and (p, j) in cells and cells[(p, j)] == best.get(j):
                t.bold.add((i, 1 + j))
    return t


def _delta_table(frame: pd.DataFrame, paired: pd.DataFrame, presets: Sequence[str], baseline: str, lab) -> _Table:
    """Presets as rows, setting x domain as columns: paired difference to the baseline, mean ± std (wins/n)."""
    cols, headers = _columns(frame, lab)
    t = _Table(["preset", *headers], [], left=1)
    for p in presets:
        if p == baseline:
            continue
        row = [p]
        for c in cols:
            sel = paired[(paired["task"] == c[0]) & (paired["domains"] == c[1]) & (paired["protocol"] == c[2])
                         & (paired["domain"] == c[3]) & (paired["preset"] == p)]
            if sel.empty or math.isnan(sel["mean_diff"].iloc[0]):
                row.append("–")
                continue
            r = sel.iloc[0]
            std = "" if math.isnan(r["std_diff"]) else f" ± {r['std_diff']:.4f}"
            row.append(f"{_signed(r['mean_diff'])}{std} ({r['wins']}/{r['n']})")
        t.rows.append(row)
    return t


def _signed(v: float, digits: int = 4) -> str:
    if math.isnan(v):
        return "–"
    v = round(v, digits) + 0.0  # no "-0.0000"
    return f"{v:+.{digits}f}"


def _p_fmt(p: float) -> str:
    if math.isnan(p):
        return "–"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def _flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_CONFIG_IGNORE = re.compile(r"(^|\.)(seed|seeds|run_dir|output_dir|out|name|preset|domains|task|protocol|device)$")


def _config_table(rows: list[dict[str, Any]], presets: Sequence[str]) -> _Table | None:
    """Config keys whose values differ between presets (the first run of each preset)."""
    first: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["preset"] not in first and isinstance(r.get("config"), Mapping):
            first[r["preset"]] = _flatten(r["config"])
    if len(first) < 2:
        return None
    keys = _order(k for c in first.values() for k in c)
    varying = [k for k in keys if not _CONFIG_IGNORE.search(k)
               and len({json.dumps(c.get(k, "<absent>"), sort_keys=True, default=str) for c in first.values()}) > 1]
    if not varying:
        return None
    t = _Table(["preset", "settings that differ between presets"], [], left=2)
    for p in presets:
        if p in first:
            t.rows.append([p, ", ".join(f"{k}={first[p].get(k, '–')}" for k in varying if k in first[p])])
    return t


def write_report(results: str | os.PathLike | Sequence[str | os.PathLike] | Sequence[Mapping[str, Any]],
                 out_dir: str | os.PathLike, baseline: str = "baseline", metric: str = "NDCG@10",
                 title: str = "FisherTune experiments", source: str | None = None,
                 budgets: Sequence[int] | None = None) -> Path:
    """Write ``report.md``, ``report.html`` (self-contained: PNGs embedded as base64, inline CSS),
    the PNGs and ``summary.csv`` / ``paired.csv`` / ``selection.csv`` / ``budget.csv`` / ``timing.csv`` /
    ``fisher.csv`` into ``out_dir``; returns the markdown path.

    ``results`` is a results file (or several) or the rows themselves. ``metric`` is the primary
    metric of the opening table, the paired section and the validation pick; it must be a test metric
    of the results. ``source`` names where rows passed in directly came from (for the header).
    ``budgets``: the epochs of the equal-budget validation table (None: :func:`default_budgets`).
    """
    if isinstance(results, (str, os.PathLike)) or (isinstance(results, Sequence) and results
                                                    and isinstance(results[0], (str, os.PathLike))):
        sources = [str(results)] if isinstance(results, (str, os.PathLike)) else [str(r) for r in results]
        rows = load_results(results)
    else:
        sources = [source or "(rows)"]
        rows = validate_rows(results)
    if not rows:
        raise ResultsError(f"no runs in {', '.join(sources)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings, domains, presets = _orders(rows, baseline)
    frames = {split: summarise(rows, baseline, split) for split in ("test", "test_full", "valid")}
    frames = {s: f for s, f in frames.items() if not f.empty}
    test = frames["test"]
    metrics = summary_metrics(test)
    if metric not in metrics:
        raise ValueError(f"metric '{metric}' is not among the test metrics of the results: {', '.join(metrics)}")
    paired = pd.concat([paired_comparison(rows, baseline, s) for s in frames if s != "valid"], ignore_index=True)
    sel = selection_table(rows, metric)
    budget = budget_table(rows, metric, budgets, baseline)
    timing = timing_table(rows, baseline)
    ft = fisher_table(rows, baseline)
    colors = _colors(presets)
    has_base = baseline in presets
    lab = _labeller(settings)

    doc = _Doc()
    doc.h(1, title)
    seeds = sorted({r["seed"] for r in rows})
    doc.p(f"{len(rows)} runs from {', '.join(f'`{s}`' for s in sources)}: {len(presets)} presets "
          f"({', '.join(presets)}), seeds {', '.join(map(str, seeds))}, "
          f"{'; '.join(_setting_name(*s) or '(no task)' for s in settings)}. "
          f"Test metrics are means ± sample std over seeds (std needs 2 seeds); **bold** is the best mean "
          f"of a column (higher is better). Baseline: `{baseline}`.")
    if any(st[2] == "original" for st in settings):
        doc.p("Settings marked [original] follow the original UniCDR code's protocol, which picks the epoch on "
              "the test set: they are there for comparison with published figures, not as results.")
    doc.h(2, f"Results: test {metric}")
    doc.table(_short_table(test, metric, presets, timing, lab))
    pm = paired[(paired["metric"] == metric) & (paired["split"] == "test")] if has_base else paired
    if not pm.empty:
        doc.p(f"Change in test {metric} against {baseline}, paired by seed: mean ± std of the difference "
              f"(seeds better / seeds shared).")
        doc.table(_delta_table(test, pm, presets, baseline, lab))
    elif not has_base:
        doc.p(f"No runs of the baseline preset '{baseline}': no paired comparison (see below).")

    for split, frame in frames.items():
        doc.h(2, f"All metrics, {SPLIT_TITLES.get(split, split)}")
        if split == "valid":
            doc.p("Validation metrics of the selected epoch: used to choose, never to report.")
        doc.table(_summary_table(frame, summary_metrics(frame), lab))

    doc.h(2, f"Paired comparison against {baseline}")
    if not has_base:
        doc.p(f"No runs of the baseline preset '{baseline}' in the results (presets present: "
              f"{', '.join(presets)}), so there is nothing to pair with: run it, or name another preset with "
              f"--baseline.")
    elif paired.empty:
        doc.p(f"Only the baseline preset '{baseline}' is in the results: nothing to compare.")
    else:
        doc.p(f"Preset minus {baseline} on the seeds both ran (paired by seed), per domain: mean and sample std "
              f"of the difference, relative change, two-sided paired t-test p-value (scipy `ttest_rel`) and "
              f"wins / losses / ties over seeds. With fewer than 2 shared seeds the std and the test are "
              f"undefined (–) and the note says so. Primary metric {metric}; every metric is in `paired.csv`.")
        for split in [s for s in frames if s != "valid"]:
            pm = paired[(paired["metric"] == metric) & (paired["split"] == split)]
            if pm.empty:
                continue
            doc.h(3, f"{metric}, {SPLIT_TITLES.get(split, split)}")
            t = _Table(["setting", "domain", "preset", "n", "Δ mean", "Δ std", "Δ %", "p", "W/L/T", "note"], [],
                       left={0, 1, 2, 9})
            for i, (_, r) in enumerate(pm.iterrows()):
                t.rows.append([lab(r["task"], r["domains"], r["protocol"]), r["domain"], r["preset"],
                               str(r["n"]), _signed(r["mean_diff"]), _fmt(r["std_diff"]),
                               "–" if math.isnan(r["rel_diff"]) else f"{_signed(100 * r['rel_diff'], 1)}%",
                               _p_fmt(r["p_value"]), f"{r['wins']}/{r['losses']}/{r['ties']}", r["note"]])
                if not math.isnan(r["p_value"]) and r["p_value"] < 0.05:
                    t.bold.add((i, 7))
            doc.table(t)
        doc.p("p < 0.05 in bold; with a handful of seeds a t-test has little power, and no correction for the number of "
              "comparisons is made: read the differences with their spread.")

    doc.h(2, "Bar charts")
    for split, frame in frames.items():
        if split == "valid":
            continue
        for m in _headline_metrics(summary_metrics(frame), metric):
            doc.img(f"bar_{split}_{_safe(m)}.png", _bar_chart(frame, m, presets, split), f"{m} {split}")

    doc.h(2, f"Model selection: validation vs test ({metric})")
    if sel["best_on_valid"].isna().all():
        doc.p(f"No validation {metric} in the results: the honest pick (on validation) cannot be named.")
    else:
        doc.p("The preset to report as 'the best' is the one best on validation; picking the one best on test "
              "would choose on the test set and overstate the result.")
        t = _Table(["setting", "domain", "best on valid", "its valid", "its test", "best on test", "its test",
                    "same?"], [], left={0, 1, 2, 5, 7})
        for _, r in sel.iterrows():
            t.rows.append([lab(r["task"], r["domains"], r["protocol"]), r["domain"],
                           r["best_on_valid"] or "–", _fmt(r["valid_pick_valid"]), _fmt(r["valid_pick_test"]),
                           r["best_on_test"] or "–", _fmt(r["test_pick_test"]), "yes" if r["agree"] else "no"])
        doc.table(t)
        for _, r in sel.iterrows():
            if r["domain"] == "(mean)" or len(domains[(r["task"], r["domains"], r["protocol"])]) == 1:
                name = _setting_name(r["task"], r["domains"], r["protocol"])
                if r["best_on_valid"] is None:
                    continue
                if r["agree"]:
                    doc.p(f"{name}: **{r['best_on_valid']}** is best on validation and on test "
                          f"(test {metric} {_fmt(r['valid_pick_test'])}).")
                else:
                    doc.p(f"{name}: the honest pick is **{r['best_on_valid']}** (best on validation, test {metric} "
                          f"{_fmt(r['valid_pick_test'])}); {r['best_on_test']} is best on test "
                          f"({_fmt(r['test_pick_test'])}) but choosing it would be selecting on test.")

    doc.h(2, f"Validation {metric} within equal epoch budgets")
    if budget.empty or budget["n"].sum() == 0:
        doc.p(f"No validation {metric} over epochs (history) in the results.")
    else:
        doc.p(f"Best validation {metric} (mean over the pair's domains) within the first E epochs, mean ± std "
              f"over the runs that count at E (n of all): it compares presets whose runs were cut by a time limit "
              f"at different epochs. A run cut before E does not count at E; one that stopped early does (its best "
              f"is final). Validation only: for choosing and for reading the curves, not a test result.")
        es = sorted(budget["budget"].unique())
        t = _Table(["setting", "preset", *(f"E = {e}" for e in es)], [], left=2)
        for (task, doms, prot, p), g in budget.groupby([*SETTING, "preset"], sort=False):
            cells = {int(r["budget"]): f"{_mean_std(r['mean'], r['std'], r['n'])} ({r['n']}/{r['runs']})"
                     for _, r in g.iterrows()}
            t.rows.append([lab(task, doms, prot), p, *(cells.get(int(e), "–") for e in es)])
        doc.table(t)

    doc.h(2, "Time per epoch")
    if timing["time_per_epoch_s_mean"].isna().all():
        doc.p("No time_per_epoch_s in the results.")
    else:
        t = _Table(["setting", "preset", "n", "s / epoch", f"× {baseline}", "Fisher s", "epochs run", "best epoch",
                    "active ratio", "stopped by"], [], left=2)
        for _, r in timing.iterrows():
            t.rows.append([lab(r["task"], r["domains"], r["protocol"]), r["preset"], str(r["n"]),
                           _mean_std(r["time_per_epoch_s_mean"], r["time_per_epoch_s_std"], r["n"], 3),
                           _fmt(r["ratio_to_baseline"], 2), _fmt(r["fisher_time_s_mean"], 2),
                           _fmt(r["epochs_run_mean"], 1), _fmt(r["best_epoch_mean"], 1),
                           "–" if math.isnan(r["active_ratio_mean"]) else f"{100 * r['active_ratio_mean']:.1f}%",
                           r["stopped"] or "–"])
        doc.table(t)
        doc.p(f"× {baseline}: mean time per epoch over the baseline's in the same setting (the target for "
              f"FisherTune is ≤ 1.2×). Fisher s: time spent estimating Fisher / DR-FIM in the run. Stopped by: "
              f"early_stop (patience), epochs (the last epoch), time_limit (train.time_limit_s: a run cut "
              f"short, its best epoch tested; not converged if its best epoch is its last).")

    doc.h(2, "Thresholds and active ratio over epochs")
    any_curve = False
    for s in settings:
        srows = [r for r in rows if tuple(r[k] for k in SETTING) == s]
        name = _setting_name(*s)
        if len(settings) > 1:
            doc.h(3, name or "(no task)")
        any_curve |= doc.img(f"curves_{_safe(name)}.png", _curves_chart(srows, presets, colors),
                             f"threshold and active ratio, {name}")
        doc.img(f"valid_{_safe(name)}_{_safe(metric)}.png",
                _valid_chart(srows, presets, domains[s], metric, colors), f"validation {metric}, {name}")
    if not any_curve:
        doc.p("No preset logged thresholds or active ratios per epoch (the baseline does not).")
    else:
        doc.p("Mean over seeds at each epoch (over the seeds still running: early stopping ends some sooner); "
              "one panel per parameter group; thresholds are drawn from the first tuning epoch on.")

    doc.h(2, "Fisher and DR-FIM per parameter group")
    any_hist = False
    for s in settings:
        srows = [r for r in rows if tuple(r[k] for k in SETTING) == s]
        name = _setting_name(*s)
        sft = ft[(ft["task"] == s[0]) & (ft["domains"] == s[1]) & (ft["protocol"] == s[2])]
        if len(settings) > 1 and (not sft.empty or any(r.get("importance_hist") for r in srows)):
            doc.h(3, name or "(no task)")
        any_hist |= doc.img(f"importance_{_safe(name)}.png", _hist_chart(srows, presets, colors),
                            f"importance distribution, {name}")
        if not sft.empty:
            doc.img(f"quantiles_{_safe(name)}.png", _quantile_chart(sft, presets, colors), f"quantiles, {name}")
            stat_cols = [c for c in sft.columns[len(SETTING) + 4:] if sft[c].notna().any()]
            t = _Table(["preset", "group", "quantity", "n", *stat_cols], [], left=3)
            for _, r in sft.iterrows():
                t.rows.append([r["preset"], r["group"], r["quantity"], str(r["n"]),
                               *("–" if math.isnan(r[c]) else f"{r[c]:.4g}" for c in stat_cols)])
            doc.table(t)
            any_hist = True
    if not any_hist:
        doc.p("No fisher_summary or importance_hist in the results (only FisherTune presets log them).")
    else:
        doc.p("Histogram: density of the logged (normalised) importance that the thresholds act on, per group "
              "(seeds with equal bin edges pooled). Table and quantile chart: the logged statistics of the Fisher "
              "on the data (fisher), on the perturbed data (fisher_perturbed) and of DR-FIM per group, means over "
              "seeds; `drfim_extra / drfim` is the share of DR-FIM that its domain-shift term makes (ratio of the "
              "means); `scale` is the Fisher scale DR-FIM was computed against. On a log axis, quantiles <= 0 "
              "are drawn at its bottom.")

    ctab = _config_table(rows, presets)
    if ctab is not None:
        doc.h(2, "Presets")
        doc.table(ctab)

    notes = [n for r in rows for n in r.get("_notes", [])]
    if notes:
        doc.h(2, "Notes")
        for n in notes[:50]:
            doc.p(n)

    for name, data in doc.images.items():
        atomic_write_bytes(out / name, data)
    atomic_write_text(out / "summary.csv", pd.concat(frames.values(), ignore_index=True).to_csv(index=False))
    atomic_write_text(out / "paired.csv", paired.to_csv(index=False))
    atomic_write_text(out / "selection.csv", sel.to_csv(index=False))
    atomic_write_text(out / "budget.csv", budget.to_csv(index=False))
    atomic_write_text(out / "timing.csv", timing.to_csv(index=False))
    atomic_write_text(out / "fisher.csv", ft.to_csv(index=False))
    atomic_write_text(out / "report.html", _render_html(doc, title))
    path = out / "report.md"
    atomic_write_text(path, _render_md(doc))
    return path
