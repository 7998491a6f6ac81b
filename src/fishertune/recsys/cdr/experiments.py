"""The experiments runner: FisherTune presets x seeds x domain pairs, one JSON line per finished run.

Every run has a fixed run directory (:meth:`RunSpec.run_dir`: results file, pair, preset, seed, config hash),
so an interrupted run resumes from its last epoch checkpoint; a finished run is a row in the results
file and is skipped. Rows are appended whole, in one write, under a file lock, so parallel workers
(``jobs > 1``, e.g. several runs sharing one GPU) never interleave or duplicate lines.

Row schema (``fishertune report`` reads it)::

    {"preset", "seed", "task", "domains", "protocol", "selection", "config", "run_dir",
     "metrics": {domain: {"test": {...}, "valid": {...}, "test_full": {...}}},
     "best_epoch", "epochs_run", "stop_reason", "time_per_epoch_s", "fisher_time_s", "active_ratio",
     "history": [...], "fisher_summary": {...}, "importance_hist": {...}}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fishertune.config import ConfigError
from fishertune.recsys.cdr.config import CDRConfig, load_cdr_config
from fishertune.recsys.cdr.rows import holdout
from fishertune.tune import load_presets
from fishertune.utils.io import append_jsonl, file_lock

__all__ = [
    "DEFAULT_QUICK_CONFIG",
    "DEFAULT_RESULTS",
    "QUICK_PRESETS",
    "RunSpec",
    "append_row",
    "plan_runs",
    "read_results",
    "resolve_presets",
    "row_key",
    "run_experiments",
    "run_one",
]

QUICK_PRESETS = ("baseline", "default")
DEFAULT_RESULTS = "runs/experiments/results.jsonl"
DEFAULT_QUICK_CONFIG = "configs/cdr/quick.yaml"
KEY_FIELDS = ("preset", "seed", "task", "domains", "protocol")
# train keys that say when to stop or save, not what is trained: left out of a run directory's identity,
# so an interrupted run resumes when they change (e.g. a time limit set for the rest of a session)
NOT_IDENTITY = ("time_limit_s", "checkpoint_every")


@dataclass(frozen=True)
class RunSpec:
    """One run to make: a preset at a seed on a pair, from a base config and overrides."""

    preset: str
    seed: int
    domains: str
    config_path: str | None
    overrides: tuple[str, ...]
    results: str

    def config(self) -> CDRConfig:
        presets = load_presets()
        return load_cdr_config(self.config_path, [*self.overrides, f"train.seed={self.seed}",
                                                  f"data.domains={self.domains}"], preset=presets[self.preset])

    def key(self, cfg: CDRConfig) -> tuple:
        """The run's identity in the results file (see :func:`row_key`)."""
        return (self.preset, self.seed, cfg.data.task, cfg.data.domains, cfg.data.protocol, cfg.data.holdout)

    def run_dir(self, cfg: CDRConfig) -> Path:
        """``<results dir>/runs/<results stem>/<task>/<pair>/<protocol>/<preset>/seed<k>-<config hash>``: a
        run resumes only a directory made with the same resolved config (``train.time_limit_s`` and
        ``train.checkpoint_every`` aside)."""
        config = cfg.model_dump(mode="json")
        config["train"] = {k: v for k, v in config["train"].items() if k not in NOT_IDENTITY}
        blob = json.dumps(config, sort_keys=True).encode()
        tag = hashlib.sha256(blob).hexdigest()[:8]
        root = Path(self.results).parent / "runs" / Path(self.results).stem
        return (root / cfg.data.task / cfg.data.domains / cfg.data.protocol / self.preset
                / f"seed{self.seed}-{tag}")


def row_key(row: dict[str, Any]) -> tuple:
    """A run's identity in a results file: :data:`KEY_FIELDS` and whether it is a refit."""
    return (*(row.get(k) for k in KEY_FIELDS), holdout(row))


def resolve_presets(targets: Sequence[str]) -> list[str]:
    """``quick`` -> baseline + default; ``all`` -> every preset; names -> themselves (checked)."""
    presets = load_presets()
    out: list[str] = []
    for t in targets:
        if t == "quick":
            names = list(QUICK_PRESETS)
        elif t == "all":
            names = list(presets)
        elif t in presets:
            names = [t]
        else:
            raise ConfigError(f"unknown preset {t!r}; use quick, all or preset names: {', '.join(presets)}")
        out += [n for n in names if n not in out]
    if not out:
        raise ConfigError("no preset to run: name quick, all or presets")
    return out


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a results file (a torn last line, from a crash mid-write elsewhere, is ignored)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def append_row(path: str | Path, row: dict[str, Any]) -> bool:
    """Append ``row`` unless a row with its key is there; one write under a lock. Returns whether written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path):
        if any(row_key(r) == row_key(row) for r in read_results(path)):
            return False
        append_jsonl(path, row)
    return True


def _finite(obj: Any) -> Any:
    """JSON has no NaN / inf: they become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def plan_runs(presets: Sequence[str], seeds: int, domains: Sequence[str] | None, config_path: str | None,
              overrides: Sequence[str], results: str) -> list[RunSpec]:
    """Every (pair, preset, seed) run, the pair from ``domains`` or the config."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    if not domains:
        domains = [load_cdr_config(config_path, overrides).data.domains]
    return [RunSpec(p, s, d, config_path, tuple(overrides), results)
            for d in domains for p in presets for s in range(seeds)]


def run_one(spec: RunSpec, threads: int | None = None, echo: bool = True,
            cfg: CDRConfig | None = None) -> dict[str, Any] | None:
    """Train one run (resuming its directory) and append its row; ``None`` if it was already there.
    ``cfg``: the spec's resolved config when the caller has it."""
    import torch

    from fishertune.recsys.cdr.train import train_cdr

    if threads:
        torch.set_num_threads(threads)
    cfg = cfg or spec.config()
    key = spec.key(cfg)
    if any(row_key(r) == key for r in read_results(spec.results)):
        return None
    run_dir = spec.run_dir(cfg)
    result = train_cdr(cfg, run_dir, echo=echo)
    row = {"preset": spec.preset, "seed": spec.seed, "task": cfg.data.task, "domains": cfg.data.domains,
           "protocol": cfg.data.protocol, "config": cfg.model_dump(mode="json"), "run_dir": str(run_dir),
           **{k: v for k, v in result.items() if k != "protocol"}}
    row = _finite(row)
    append_row(spec.results, row)
    return row


def _worker(spec: RunSpec, threads: int) -> tuple[RunSpec, dict[str, Any] | None]:
    import logging

    logging.basicConfig(level=logging.INFO, format=f"[{spec.preset}/seed{spec.seed}/{spec.domains}] %(message)s")
    return spec, run_one(spec, threads=threads)


def run_experiments(targets: Sequence[str], config_path: str | None = None, seeds: int = 1,
                    results: str = DEFAULT_RESULTS, overrides: Sequence[str] = (), jobs: int = 1,
                    domains: Sequence[str] | None = None,
                    on_row: Callable[[RunSpec, dict[str, Any] | None], None] | None = None) -> list[dict[str, Any]]:
    """Run what is not in ``results`` yet; return every row of the results file for the planned runs."""
    presets = resolve_presets(targets)
    specs = plan_runs(presets, seeds, domains, config_path, overrides, results)
    cfgs = {spec: spec.config() for spec in specs}  # validate every config before the first long run
    done = {row_key(r) for r in read_results(results)}
    todo = [spec for spec in specs if spec.key(cfgs[spec]) not in done]
    if jobs <= 1:
        for spec in todo:
            row = run_one(spec, cfg=cfgs[spec])
            if on_row is not None:
                on_row(spec, row)
    else:
        import multiprocessing as mp

        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_worker, spec, threads) for spec in todo]
            for fut in as_completed(futures):
                spec, row = fut.result()
                if on_row is not None:
                    on_row(spec, row)
    wanted = {spec.key(cfg) for spec, cfg in cfgs.items()}
    return [r for r in read_results(results) if row_key(r) in wanted]
