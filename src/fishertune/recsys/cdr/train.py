"""Training and evaluating the cross-domain model: one plain loop, FisherTune hooks where it needs them.

Each step takes one batch per domain and sums their losses (UniCDR's schedule); an epoch is a pass over
the larger domain's training interactions. Every epoch's randomness comes from generators seeded by
``(seed, epoch)``, so resuming from an epoch checkpoint gives exactly the run an uninterrupted one
would. Validation after every ``eval_every`` epochs: the sampled protocol on each domain's validation
instances; the monitor is the mean over the two domains of NDCG@10; early stopping with patience; the
best state is kept and tested at the end (sampled and full ranking).

With ``fishertune.use_fishertune`` the :class:`fishertune.tune.FisherTuner` builds the optimiser and is
called at epoch start/end and around each optimiser step; without it this is the baseline (Adam).

``protocol: original`` selects on the test instances with a second negative draw, as UniCDR's code
does. That is test-set selection; every output of such a run says so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fishertune.recsys.cdr.batches import (
    Histories,
    TrainSampler,
    eval_batch,
    item_similarity_scores,
)
from fishertune.recsys.cdr.config import CDRConfig
from fishertune.recsys.cdr.data import CDRData, eval_matrices, load_cdr
from fishertune.recsys.cdr.model import UniCDR
from fishertune.recsys.cdr.perturb import (
    fisher_batches_for,
    fisher_fn_for,
    make_perturbation,
)
from fishertune.recsys.checkpoint import CheckpointError
from fishertune.recsys.evaluate import evaluate_full, evaluate_sampled
from fishertune.recsys.rundir import RunDir
from fishertune.recsys.train import NonFiniteLossError, _cpu_state, resolve_device
from fishertune.tune import FisherTuner
from fishertune.utils.numerics import flush_denormals
from fishertune.utils.progress import track

__all__ = [
    "REFIT_LABEL",
    "SELECTION_LABEL",
    "CDRContext",
    "build_context",
    "evaluate_model",
    "evaluate_stage",
    "train_cdr",
]

SELECTION_LABEL = "TEST-SET SELECTION (protocol original: best epoch chosen on test.txt, second negative draw)"
REFIT_LABEL = "none (refit: every training interaction, the last epoch tested)"
MONITOR = "NDCG@10"


@dataclass
class CDRContext:
    """What training and evaluation share: data, device-side histories, sampler, model."""

    cfg: CDRConfig
    data: CDRData
    data_hash: str
    device: torch.device
    hist_train: Histories
    hist_full: Histories
    sampler: TrainSampler
    model: UniCDR
    # per (domain, stage): the instance-level (input, target) matrices, built once; and the stages whose
    # fixed negatives were checked against targets and histories (validation reruns skip that check)
    eval_mats: dict[tuple[str, str], tuple] = field(default_factory=dict)
    negatives_checked: set[tuple[str, str]] = field(default_factory=set)


def _weights(cfg: CDRConfig, mats) -> list | None:
    return [item_similarity_scores(m) for m in mats] if cfg.model.aggregator == "item_similarity" else None


def build_context(cfg: CDRConfig, data: CDRData | None = None, data_hash: str = "") -> CDRContext:
    """Load (or take) the scenario, put it on the device, build the sampler and a fresh model."""
    if data is None:
        d = cfg.data
        data, data_hash = load_cdr(d.task, d.domains, d.val_seed, d.n_negatives, d.negative_seed)
    device = resolve_device(cfg.train.device)
    parts = [data[dom] for dom in data.domains]
    full_m = [p.train_full for p in parts]
    train_m = [p.train for p in parts] if cfg.data.holdout else full_m  # no hold-out: the refit
    hist_train = Histories(train_m, device, _weights(cfg, train_m))
    same = all((a != b).nnz == 0 for a, b in zip(train_m, full_m))
    hist_full = hist_train if same else Histories(full_m, device, _weights(cfg, full_m))
    m = cfg.model
    sampler = TrainSampler(hist_train, train_m, data.shared, data.task, cfg.train.batch_size, m.max_len,
                           m.mask_rate, m.n_train_negatives)
    torch.manual_seed(cfg.train.seed)
    model = UniCDR(m, data.n_users, data.domains, tuple(p.n_items for p in parts)).to(device)
    return CDRContext(cfg, data, data_hash, device, hist_train, hist_full, sampler, model)


# ------------------------------------------------------------------------------------------ evaluation

_NAMES = {"hr": "HR", "ndcg": "NDCG", "mrr": "MRR", "recall": "Recall", "precision": "Precision"}


def _rename(metrics: dict[str, float]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if key == "n_users":
            out["n"] = int(value)
            continue
        name, _, k = key.partition("@")
        out[_NAMES.get(name, name) + (f"@{k}" if k else "")] = float(value)
    return out


def _autocast(ctx: CDRContext):
    if ctx.cfg.train.amp and ctx.device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate_stage(ctx: CDRContext, domain: str, stage: str, full: bool = False) -> dict[str, float]:
    """Metrics of one domain on ``valid``, ``test`` or ``select`` (protocol original's second draw).

    Sampled: each instance's item against its ``n_negatives`` fixed negatives (MRR, NDCG@K, HR@K);
    ``full=True``: against every item, the user's training items masked. Evaluation contexts are drawn
    with a generator seeded per stage, so they are the same every time.
    """
    d = ctx.data.domains.index(domain)
    part = ctx.data[domain]
    src = "test" if stage == "select" else stage
    if (domain, stage) not in ctx.eval_mats:
        ctx.eval_mats[(domain, stage)] = eval_matrices(part, stage)
    inp, tgt = ctx.eval_mats[(domain, stage)]
    users = torch.from_numpy(part.users[src]).to(ctx.device)
    hist = ctx.hist_train if stage == "valid" else ctx.hist_full
    model = ctx.model
    was_training = model.training
    model.eval()
    seed = 1_000_003 * (ctx.cfg.data.negative_seed + 1) + ("valid", "test", "select").index(stage)

    def make_score_fn() -> Callable:
        gen = torch.Generator(ctx.device).manual_seed(seed)

        def score_fn(rows: torch.Tensor, _history: torch.Tensor) -> torch.Tensor:
            # no autocast here: bfloat16 scores would tie often among 1,000 candidates (ties count against)
            batch = eval_batch(hist, d, users[rows], ctx.data.task, ctx.cfg.model.eval_max_len, gen,
                               ctx.cfg.model.eval_shared_own)
            return model.score_all(batch).float()
        return score_fn

    ev = ctx.cfg.eval
    try:
        with flush_denormals(ctx.device):  # trained embeddings hold denormals: slow on the CPU
            if full:
                out = evaluate_full(make_score_fn(), inp, tgt, ks=ev.full_ks, metrics=("hr", "ndcg", "mrr"),
                                    batch_size=ev.batch_size, device=ctx.device)
            else:
                out = evaluate_sampled(make_score_fn(), inp, tgt, negatives=part.negatives[stage], ks=ev.ks,
                                       batch_size=ev.batch_size, device=ctx.device,
                                       check_negatives=(domain, stage) not in ctx.negatives_checked)
                ctx.negatives_checked.add((domain, stage))
    finally:
        model.train(was_training)
    return _rename(out)


def evaluate_model(ctx: CDRContext, stages: tuple[str, ...] | None = None) -> dict[str, Any]:
    """``{domain: {"valid": ..., "test": ..., "test_full": ...}}`` (``valid`` is ``select`` under
    protocol original). By default the stages the config has: no ``valid`` for a refit (its model trained
    on the validation items), no ``test_full`` with ``eval.full=false``."""
    if stages is None:
        stages = ("valid",) if ctx.cfg.data.holdout else ()
        stages += ("test", "test_full") if ctx.cfg.eval.full else ("test",)
    sel = "select" if ctx.cfg.data.protocol == "original" else "valid"
    out: dict[str, Any] = {}
    for dom in ctx.data.domains:
        out[dom] = {}
        for stage in stages:
            if stage == "test_full":
                out[dom][stage] = evaluate_stage(ctx, dom, "test", full=True)
            else:
                out[dom][stage] = evaluate_stage(ctx, dom, sel if stage == "valid" else stage)
    return out


def _monitor(ctx: CDRContext) -> tuple[dict[str, dict[str, float]], float]:
    sel = "select" if ctx.cfg.data.protocol == "original" else "valid"
    metrics = {dom: evaluate_stage(ctx, dom, sel) for dom in ctx.data.domains}
    return metrics, float(np.mean([m[MONITOR] for m in metrics.values()]))


# -------------------------------------------------------------------------------------------- FisherTune


def _make_tuner(ctx: CDRContext, seed: int, log: Callable[[str], None]) -> FisherTuner:
    """The FisherTuner of this model; with ``use_fishertune=false`` it only builds the optimiser (the
    baseline: same parameter groups, rates and weight decays) and its hooks do nothing."""
    ft = ctx.cfg.fishertune
    pert = make_perturbation(ctx) if ft.use_fishertune else None
    return FisherTuner(ctx.model, ft, groups=ctx.model.parameter_groups(), fisher_fn=fisher_fn_for(ctx),
                       fisher_batches=fisher_batches_for(ctx, seed), perturbation=pert, seed=seed, log=log,
                       total_epochs=ctx.cfg.train.epochs)


def _plain_row(row: Any) -> dict[str, Any]:
    """A tuner log row as JSON-ready numbers."""
    if not isinstance(row, dict):
        return {}
    out: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out[k] = _plain_row(v)
        elif isinstance(v, torch.Tensor) and v.numel() == 1:
            out[k] = float(v)
        elif isinstance(v, (bool, int, float, str)) or v is None:
            out[k] = v
        elif isinstance(v, (np.integer, np.floating)):
            out[k] = v.item()
    return out


# ---------------------------------------------------------------------------------------------- training


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**63 - 1)


def train_step(ctx: CDRContext, opt: torch.optim.Optimizer, tuner: FisherTuner, step_batches: list,
               shift_gen: torch.Generator | None = None,
               after_backward: Callable[[], None] | None = None) -> torch.Tensor:
    """One optimiser step on a batch per domain: loss (+ FisherTune's EWC value), backward, the tuner's
    hooks around ``opt.step()`` (masks, natural gradient, EWC gradient), gradient clipping. Returns
    ``[loss, rec, contrastive]`` (detached, on the device: no sync). ``shift_gen`` draws the critic's
    negative shift (``None``: shift 1); ``after_backward`` runs between backward and the step (the
    benchmark's timer)."""
    model = ctx.model
    with _autocast(ctx):
        terms = [model.loss_terms(b, shift=1 if shift_gen is None else
                                  int(torch.randint(1, max(2, len(b)), (1,), generator=shift_gen)))
                 for b in step_batches]
        loss = sum(x["loss"] for x in terms)
    if tuner.enabled:
        loss = loss + tuner.penalty()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if after_backward is not None:
        after_backward()
    tuner.before_step(len(step_batches[0]))
    if ctx.cfg.train.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), ctx.cfg.train.grad_clip)
    opt.step()
    tuner.after_step()
    return torch.stack([loss.detach().float(), sum(x["rec"] for x in terms).float(),
                        sum(x["contrastive"] for x in terms).float()])


def train_cdr(cfg: CDRConfig, run_dir: str | Path | None = None, ctx: CDRContext | None = None,
              echo: bool = True) -> dict[str, Any]:
    """Train with early stopping on validation, test the best state, and return the results row body.

    ``run_dir``: config, ``train.log``, ``history.jsonl``, ``curves.png``, ``checkpoint.pt`` and
    ``results.json`` go there, and an existing checkpoint is resumed. Returns ``{"metrics",
    "best_epoch", "epochs_run", "time_per_epoch_s", "fisher_time_s", "active_ratio", "history",
    "fisher_summary", "importance_hist", "protocol", "selection"}``.
    """
    ctx = ctx or build_context(cfg)
    t = cfg.train
    rd = RunDir(run_dir, echo=echo)
    config = cfg.model_dump(mode="json")
    rd.write_config(config)
    model, device = ctx.model, ctx.device
    tuner = _make_tuner(ctx, t.seed, rd.log)
    # foreach: torch's default only on CUDA; on CPU it makes Adam's step much faster too
    opt = tuner.make_optimizer("adam", foreach=True if device.type == "cpu" else None)
    on = tuner.enabled
    label = (SELECTION_LABEL if cfg.data.protocol == "original" else "validation" if cfg.data.holdout
             else REFIT_LABEL)
    epoch, history, best_epoch, best_score, bad, best_state, fisher_time = 0, [], 0, -math.inf, 0, None, 0.0
    if rd.has_checkpoint():
        ck = rd.load_checkpoint(ctx.data_hash)
        if ck.get("kind") != "cdr":
            raise CheckpointError(f"{rd.checkpoint_path}: not a cross-domain run's checkpoint; use a new run dir")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        tuner.load_state_dict(ck["tuner"])
        epoch, history = int(ck["epoch"]), list(ck["history"])
        best_epoch, best_score, bad = int(ck["best_epoch"]), float(ck["best_score"]), int(ck["bad"])
        best_state, fisher_time = ck.get("best_model"), float(ck.get("fisher_time", 0.0))
        if ck.get("config") != config:
            rd.log("note: the config differs from the checkpoint's; continuing with the current one")
        rd.log(f"resumed after epoch {epoch}")
    n_params = sum(p.numel() for p in model.parameters())
    rd.log(f"{cfg.data.task} {cfg.data.domains}: {ctx.data.n_users:,} users, items "
           f"{dict(zip(ctx.data.domains, ctx.model.n_items))}, {n_params:,} parameters, device {device}, "
           f"{len(ctx.sampler)} steps/epoch, FisherTune {'on' if on else 'off'}, selection: {label}", flush=True)
    stopped = t.patience is not None and bad >= t.patience
    timed_out, t_start = False, time.perf_counter()

    def checkpoint(finished: bool, model_state: dict[str, torch.Tensor] | None = None) -> None:
        state = {"kind": "cdr", "model": model_state if model_state is not None else model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                 "history": history, "best_epoch": best_epoch, "best_score": best_score, "bad": bad,
                 "fisher_time": fisher_time, "config": config, "data_hash": ctx.data_hash, "finished": finished}
        if best_state is not None:
            state["best_model"] = best_state
        state["tuner"] = tuner.state_dict()
        rd.save_checkpoint(state)
        rd.write_history(history)
        rd.plot(_curves(history), "valid_mean_ndcg@10", force=finished)
        rd.flush_log()

    while epoch < t.epochs and not stopped:
        epoch += 1
        seed = _epoch_seed(t.seed, epoch)
        torch.manual_seed(seed)  # dropout
        gen = torch.Generator(device).manual_seed(seed)
        shift_gen = torch.Generator().manual_seed(seed + 1)
        model.train()
        t_f = time.perf_counter()
        tuner.on_epoch_start(epoch)
        fisher_time += time.perf_counter() - t_f
        sums = torch.zeros(3, device=device)
        t0 = time.perf_counter()
        for step_batches in track(ctx.sampler.epoch(gen), f"epoch {epoch}/{t.epochs}", total=len(ctx.sampler)):
            sums += train_step(ctx, opt, tuner, step_batches, shift_gen)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds = time.perf_counter() - t0
        loss_v, rec_v, con_v = (sums / len(ctx.sampler)).tolist()
        if not all(math.isfinite(v) for v in (loss_v, rec_v, con_v)):
            rd.log(f"stopped: non-finite loss in epoch {epoch} (loss {loss_v}, rec {rec_v}, contrastive {con_v})",
                   flush=True)
            raise NonFiniteLossError(
                f"non-finite training loss in epoch {epoch}: training stopped"
                + (f"; the last good checkpoint ({rd.checkpoint_path}) is kept" if rd.has_checkpoint() else "")
                + f". Lower the learning rate (train.lr={t.lr}) or set train.grad_clip")
        record: dict[str, Any] = {"epoch": epoch, "loss": loss_v, "rec": rec_v, "contrastive": con_v,
                                  "train_seconds": train_seconds}
        value = math.nan
        if cfg.data.holdout and (epoch % t.eval_every == 0 or epoch == t.epochs):
            t1 = time.perf_counter()
            valid, value = _monitor(ctx)
            record["valid"] = {dom: {k: v for k, v in m.items() if k != "n"} for dom, m in valid.items()}
            record["valid_mean"] = {MONITOR: value}
            record["eval_seconds"] = time.perf_counter() - t1
            if value > best_score:
                best_epoch, best_score, bad, best_state = epoch, value, 0, _cpu_state(model)
            else:
                bad += 1
            stopped = t.patience is not None and bad >= t.patience
        t_f = time.perf_counter()
        row = _plain_row(tuner.on_epoch_end(epoch, {"valid_ndcg@10": value} if not math.isnan(value) else {}))
        fisher_time += time.perf_counter() - t_f
        if on:
            record["phase"] = row.get("phase", "tune")
            for key in ("threshold", "ratio", "active"):
                if key in row:
                    record[key] = row[key]
        else:
            record["phase"] = "baseline"
        history.append(record)
        note = f" | valid mean {MONITOR} {value:.4f} (best {best_score:.4f} @ {best_epoch})" if not math.isnan(value) else ""
        rd.log(f"epoch {epoch}/{t.epochs} loss {loss_v:.4f} rec {rec_v:.4f} con {con_v:.4f}{note} | "
               f"{train_seconds:.2f} s" + (f" [{label}]" if cfg.data.protocol == "original" else ""))
        if stopped:
            rd.log(f"early stop: no improvement for {t.patience} evaluations")
        elif t.time_limit_s is not None and time.perf_counter() - t_start >= t.time_limit_s and epoch < t.epochs:
            stopped = timed_out = True
            rd.log(f"stopped: time limit of {t.time_limit_s:g} s reached after epoch {epoch}; testing "
                   + (f"the best epoch so far ({best_epoch})" if cfg.data.holdout else "this epoch (refit)"))
        if t.checkpoint_every and epoch % t.checkpoint_every == 0 and not stopped and epoch < t.epochs:
            checkpoint(False)
        else:
            rd.write_history(history)
            rd.flush_log()

    stop_reason = "time_limit" if timed_out else "early_stop" if stopped else "epochs"
    if not cfg.data.holdout:
        best_epoch = epoch  # a refit tests its last epoch
    last_state = _cpu_state(model)  # the checkpoint keeps the last state: a longer rerun continues from it
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    metrics = evaluate_model(ctx)
    times = [r["train_seconds"] for r in history]
    result: dict[str, Any] = {
        "protocol": cfg.data.protocol, "selection": label, "metrics": metrics, "best_epoch": best_epoch,
        "epochs_run": epoch, "stop_reason": stop_reason, "time_per_epoch_s": float(np.mean(times)) if times else 0.0,
        "fisher_time_s": fisher_time, "active_ratio": _active_ratio(history, tuner),
        "history": [_history_row(r) for r in history],
        "fisher_summary": _fisher_summary(tuner), "importance_hist": _importance_hist(tuner),
    }
    for dom in ctx.data.domains:
        rd.log(f"{dom} test{' [' + label + ']' if cfg.data.protocol == 'original' else ''}: "
               + " ".join(f"{k} {v:.4f}" for k, v in metrics[dom]["test"].items() if k != "n"))
    checkpoint(True, last_state)
    rd.write_json("results.json", result)
    rd.flush_log()
    return result


def _history_row(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("epoch", "loss", "rec", "contrastive", "valid", "phase", "threshold", "ratio", "train_seconds")
    return {k: r[k] for k in keys if k in r}


def _curves(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """History in the shape ``RunDir.plot`` draws (train terms, one validation metric)."""
    return [{"epoch": r["epoch"], "train": {"loss": r["loss"], "rec": r["rec"], "contrastive": r["contrastive"]},
             "valid": {"valid_mean_ndcg@10": r["valid_mean"][MONITOR]} if "valid_mean" in r else {}}
            for r in history]


def _active_ratio(history: list[dict[str, Any]], tuner) -> float:
    if not tuner.enabled:
        return 1.0
    for r in reversed(history):
        ratio = r.get("ratio")
        if isinstance(ratio, dict) and "all" in ratio:
            return float(ratio["all"])
    return 1.0


def _fisher_summary(tuner) -> dict[str, Any]:
    if not tuner.enabled:
        return {}
    summary = tuner.fisher_summary()
    return _plain_row(summary) if isinstance(summary, dict) else {}


def _importance_hist(tuner: FisherTuner, bins: int = 20) -> dict[str, Any]:
    """Per group, a histogram of the normalised importance (the values FisherTune thresholds)."""
    imp = tuner.importance() if tuner.enabled else {}
    if not imp:
        return {}
    out = {}
    for group, names in tuner.groups.items():
        tensors = [imp[n].detach().float().flatten().cpu() for n in names if n in imp]
        if not tensors:
            continue
        v = torch.cat(tensors)
        lo, hi = float(v.min()), float(v.max())
        if hi <= lo:
            hi = lo + 1e-12
        counts = torch.histc(v, bins=bins, min=lo, max=hi)
        edges = torch.linspace(lo, hi, bins + 1)
        out[group] = {"edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()]}
    return out
