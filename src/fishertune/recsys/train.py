"""The training loop: plain and readable, for every :class:`~fishertune.recsys.models.Recommender`.

Closed-form models are fitted once and evaluated. Iterative models get Adam on shuffled batches of
training rows (users with at least one training item), validation after every epoch through the
caller's ``evaluate_fn(model, stage) -> metrics``, early stopping on ``cfg.monitor`` with patience, the
best state kept, checkpoints, and resume: if ``run_dir`` holds a checkpoint the run continues from it
(model, optimiser, epoch, history, best state and every RNG stream), so an interrupted run ends exactly
where an uninterrupted one would. A non-finite loss stops training with an error; the last good
checkpoint stays.

The same loop runs under ``torchrun --nproc_per_node N``: the model is wrapped in
``DistributedDataParallel``, each global batch (the same permutation on every rank) is split across
ranks, evaluation is the caller's (pass ``distributed=True`` to the evaluator), and only rank 0 writes.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp
import torch
import torch.distributed as dist
from pydantic import Field
from torch import Tensor

from fishertune.config import ConfigError, StrictModel
from fishertune.recsys.checkpoint import CheckpointError, get_rng_state, set_rng_state
from fishertune.recsys.data.types import Split
from fishertune.recsys.models.base import Recommender
from fishertune.recsys.rundir import RunDir
from fishertune.utils.progress import track
from fishertune.utils.seed import seed_everything

__all__ = ["TrainConfig", "TrainResult", "NonFiniteLossError", "train", "maybe_init_distributed",
           "is_main_process", "rank_and_world", "resolve_device", "EvaluateFn"]

EvaluateFn = Callable[[Recommender, str], dict[str, float]]


class TrainConfig(StrictModel):
    """How a model is trained (closed-form models use only ``device`` and ``monitor``)."""

    epochs: int = Field(200, ge=1)
    batch_size: int = Field(500, ge=1, description="global batch (split across ranks when distributed)")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0, description="Adam's (coupled) L2 weight decay")
    grad_clip: float | None = Field(None, gt=0, description="max global gradient norm; None: off")
    patience: int | None = Field(20, ge=1, description="epochs without improvement before stopping")
    monitor: str = "ndcg@100"
    seed: int = 0
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    amp: bool = Field(False, description="bfloat16 autocast (CUDA only; ignored on CPU)")
    log_every: int = Field(0, ge=0, description="log the running loss every N steps (0: per epoch only)")
    checkpoint_every: int = Field(1, ge=0, description="epochs between checkpoints (0: only at the end)")
    dense_rows_mb: int = Field(1024, ge=0, description="keep the training matrix dense on the device "
                                                       "when it takes at most this many MiB")


@dataclass
class TrainResult:
    """What :func:`train` returns; the model holds the best-on-validation state."""

    best_epoch: int
    best_valid: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    epochs_run: int = 0
    stopped_early: bool = False
    resumed_from: int = 0
    seconds_per_epoch: float = 0.0

    def summary(self) -> dict[str, Any]:
        """Everything but the history (JSON-ready)."""
        out = asdict(self)
        out.pop("history")
        return out


class NonFiniteLossError(FloatingPointError, ValueError):
    """Training produced a NaN / inf loss; the message says where and what to try."""


# -------------------------------------------------------------------------------------- distributed


def maybe_init_distributed(backend: str | None = None) -> bool:
    """Initialise ``torch.distributed`` from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``...) when present: "nccl" on GPU (one device per ``LOCAL_RANK``), "gloo" on CPU.
    Returns whether a process group is active. Idempotent."""
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True unless this is a rank other than 0 of an initialised process group."""
    return rank_and_world()[0] == 0


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the process's CUDA device if there is one, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={name!r} but CUDA is not available here; use 'cpu' or 'auto'")
        if name == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


# -------------------------------------------------------------------------------------------- batches


class _Rows:
    """Dense float rows of the (binarised) training matrix on ``device``: from a dense copy held on the
    device when it is small enough, else sliced from the CSR matrix per batch."""

    def __init__(self, train: sp.csr_matrix, device: torch.device, dense_limit_mb: int) -> None:
        x = sp.csr_matrix(train, dtype=np.float32, copy=True)
        x.sum_duplicates()
        x.eliminate_zeros()
        x.data[:] = 1.0
        self.device = device
        self.csr = x
        self.dense: Tensor | None = None
        if x.shape[0] * x.shape[1] * 4 <= dense_limit_mb * 2**20:
            self.dense = torch.from_numpy(x.toarray()).to(device)

    def __call__(self, users: np.ndarray) -> Tensor:
        if self.dense is not None:
            return self.dense[torch.from_numpy(users).to(self.device)]
        rows = torch.from_numpy(self.csr[users].toarray())
        return rows.to(self.device, non_blocking=True)


def _epoch_batches(users: np.ndarray, epoch: int, cfg: TrainConfig, rank: int, world: int) -> list[np.ndarray]:
    """This rank's batches of one epoch: a permutation seeded by (seed, epoch), the same on every rank,
    cut into global batches; each global batch split into ``world`` near-equal slices (global batches
    with fewer rows than ranks are skipped)."""
    perm = users[np.random.default_rng((cfg.seed, epoch)).permutation(len(users))]
    batches = [perm[i:i + cfg.batch_size] for i in range(0, len(perm), cfg.batch_size)]
    if world == 1:
        return batches
    return [np.array_split(b, world)[rank] for b in batches if len(b) >= world]


# ------------------------------------------------------------------------------------------- helpers


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metric values as Python int / float (checkpoint- and JSON-safe)."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, (bool, np.bool_)):
            out[str(key)] = bool(value)
        elif isinstance(value, (int, np.integer)):
            out[str(key)] = int(value)
        elif isinstance(value, (float, np.floating)) or (isinstance(value, Tensor) and value.numel() == 1):
            out[str(key)] = float(value)
        # per-user arrays and other objects are not kept in the history
    return out


def _cpu_state(model: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _fmt(values: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in values.items())


def _gather_rng(world: int) -> list[dict[str, Any]]:
    state = get_rng_state()
    if world == 1:
        return [state]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, state)
    return states


def _non_finite(terms: dict[str, float], epoch: int, step: int, cfg: TrainConfig, rd: RunDir,
                last_saved: int) -> NonFiniteLossError:
    where = (f"the last good checkpoint ({rd.checkpoint_path}, epoch {last_saved}) is kept"
             if last_saved > 0 and rd.checkpoint_path is not None else "no checkpoint had been written yet")
    return NonFiniteLossError(
        f"non-finite training loss at epoch {epoch}, step {step} ({_fmt(terms)}): training stopped and "
        f"{where}. The usual cause is a learning rate too high for this model (train.lr={cfg.lr}); lower "
        "it, or set train.grad_clip" + (", or turn train.amp off" if cfg.amp else ""))


# ---------------------------------------------------------------------------------------------- train


def train(model: Recommender, split: Split, cfg: TrainConfig, evaluate_fn: EvaluateFn | None,
          run_dir: str | Path | None = None, data_hash: str = "", config: dict[str, Any] | None = None,
          on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Train (or fit) ``model`` on ``split.train``, selecting on ``evaluate_fn(model, "valid")``.

    ``run_dir``: where the config, log, history, curves and checkpoint go (``None``: nothing is
    written, no resume). An existing checkpoint there is resumed (refused if made on data whose hash is
    not ``data_hash``). ``config``: the resolved config to save (default: model and train configs).
    ``on_epoch_end(epoch, record)`` runs after each epoch's checkpoint. Returns a :class:`TrainResult`;
    ``model`` is left in eval mode with the best validation state, on the training device.
    """
    maybe_init_distributed()
    rank, world = rank_and_world()
    device = resolve_device(cfg.device)
    rd = RunDir(run_dir, enabled=rank == 0)
    if config is None:
        config = {"model": model.cfg.model_dump(mode="json"), "train": cfg.model_dump(mode="json")}
    rd.write_config(config)
    prepare = getattr(model, "prepare", None)
    if callable(prepare):  # models that derive state from the split (e.g. sequences) before training
        prepare(split)
    model.to(device)
    if split.train.shape != (split.n_users, split.n_items) or split.n_items != model.n_items:
        raise ValueError(f"split.train is {split.train.shape} for {split.n_users} users x {split.n_items} "
                         f"items; the model was built for {model.n_items} items")
    if not model.iterative:
        return _fit_closed_form(model, split, cfg, evaluate_fn, rd, data_hash, config)
    return _train_iterative(model, split, cfg, evaluate_fn, rd, data_hash, config, on_epoch_end,
                            device, rank, world)


def _load_run_checkpoint(rd: RunDir, model: Recommender, data_hash: str) -> dict[str, Any]:
    """The run directory's checkpoint, refused when made on other data or for another model."""
    ckpt = rd.load_checkpoint(data_hash)
    if ckpt.get("model_name") != model.name:
        raise CheckpointError(f"{rd.checkpoint_path}: checkpoint holds a {ckpt.get('model_name')!r} model, this "
                              f"run trains {model.name!r}; use a new run directory")
    return ckpt


def _valid(model: Recommender, evaluate_fn: EvaluateFn | None, monitor: str) -> tuple[dict[str, Any], float]:
    if evaluate_fn is None:
        return {}, math.nan
    model.eval()
    metrics = _plain(evaluate_fn(model, "valid"))
    if monitor not in metrics:
        raise ConfigError(f"train.monitor '{monitor}' is not among the validation metrics "
                          f"{sorted(metrics)}")
    return metrics, float(metrics[monitor])


def _fit_closed_form(model: Recommender, split: Split, cfg: TrainConfig, evaluate_fn: EvaluateFn | None,
                     rd: RunDir, data_hash: str, config: dict[str, Any]) -> TrainResult:
    if rd.has_checkpoint():
        ckpt = _load_run_checkpoint(rd, model, data_hash)
        if ckpt.get("finished"):
            model.load_state_dict(ckpt["model"])
            model.eval()
            rd.log(f"{model.name}: already fitted (checkpoint {rd.checkpoint_path}); loaded", flush=True)
            return TrainResult(**ckpt["result"], history=ckpt["history"])
    rd.log(f"fitting {model.name} on {split.train.nnz:,} interactions ({split.n_users:,} users x "
           f"{split.n_items:,} items)")
    t0 = time.perf_counter()
    with torch.no_grad():
        model.fit(split.train)
    fit_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    metrics, value = _valid(model, evaluate_fn, cfg.monitor)
    record = {"epoch": 1, "train": {}, "valid": metrics, "train_seconds": fit_seconds,
              "eval_seconds": time.perf_counter() - t1, "time": time.time()}
    history = [record]
    result = TrainResult(best_epoch=1, best_valid=metrics, history=history, epochs_run=1,
                         seconds_per_epoch=fit_seconds)
    rd.log(f"fitted in {fit_seconds:.2f} s" + (f"; valid {_fmt(metrics)}" if metrics else ""))
    rd.save_checkpoint({"model": model.state_dict(), "config": config, "data_hash": data_hash,
                        "model_name": model.name, "epoch": 1, "history": history, "finished": True,
                        "result": result.summary()})
    rd.write_history(history)
    rd.write_json("train_result.json", result.summary())
    rd.flush_log()
    model.eval()
    return result


def _train_iterative(model: Recommender, split: Split, cfg: TrainConfig, evaluate_fn: EvaluateFn | None,
                     rd: RunDir, data_hash: str, config: dict[str, Any],
                     on_epoch_end: Callable[[int, dict[str, Any]], None] | None,
                     device: torch.device, rank: int, world: int) -> TrainResult:
    # foreach: torch's default only on CUDA; on CPU it halves the time of Adam's step too
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 foreach=True if device.type == "cpu" else None)
    use_amp = cfg.amp and device.type == "cuda"
    if cfg.amp and not use_amp:
        rd.log("train.amp is ignored on CPU")

    # -- state, fresh or resumed
    epoch, step, history = 0, 0, []
    best_epoch, best_score, bad_epochs, best_state = 0, -math.inf, 0, None
    seed_everything(cfg.seed + rank)
    resumed_from = 0
    if rd.has_checkpoint():
        ckpt = _load_run_checkpoint(rd, model, data_hash)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:  # the current config wins over the saved one
            group["lr"], group["weight_decay"] = cfg.lr, cfg.weight_decay
        epoch, step, history = int(ckpt["epoch"]), int(ckpt["step"]), list(ckpt["history"])
        best_epoch, best_score, bad_epochs = int(ckpt["best_epoch"]), float(ckpt["best_score"]), int(ckpt["bad_epochs"])
        best_state = ckpt.get("best_model")
        rng = ckpt["rng"]
        set_rng_state(rng[rank] if rank < len(rng) else rng[0])
        resumed_from = epoch
        if ckpt.get("config") != config:
            rd.log("note: the config differs from the checkpoint's; continuing with the current one")
        if ckpt.get("finished"):
            model.eval()
            rd.log(f"run already finished (checkpoint {rd.checkpoint_path}); loaded", flush=True)
            return TrainResult(**ckpt["result"], history=history)
        rd.log(f"resumed from {rd.checkpoint_path} after epoch {epoch} (step {step})")
    last_saved = epoch

    step_module: torch.nn.Module = model
    if world > 1:
        step_module = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    make_source = getattr(model, "batch_source", None)
    if callable(make_source):  # the model makes its own batches: (users -> batch, training users)
        rows, users = make_source(split, device)
    else:
        rows = _Rows(split.train, device, cfg.dense_rows_mb)
        users = np.flatnonzero(np.diff(rows.csr.indptr) > 0)
    if len(users) == 0:
        raise ValueError("split.train has no user with a training interaction")
    n_params = sum(p.numel() for p in model.parameters())
    rd.log(f"training {model.name} ({n_params:,} parameters) on {len(users):,} users, {split.n_items:,} "
           f"items, device {device}, world size {world}, batch {cfg.batch_size}, lr {cfg.lr}", flush=True)

    def checkpoint(finished: bool, result: TrainResult | None = None) -> None:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                 "step": step, "best_epoch": best_epoch, "best_score": best_score, "bad_epochs": bad_epochs,
                 "history": history, "rng": _gather_rng(world), "config": config, "data_hash": data_hash,
                 "model_name": model.name, "finished": finished}
        if best_state is not None:
            state["best_model"] = best_state
        if result is not None:
            state["result"] = result.summary()
        rd.save_checkpoint(state)
        rd.write_history(history)
        rd.plot(history, cfg.monitor if evaluate_fn is not None else None, force=finished)
        rd.flush_log()

    stopped_early = cfg.patience is not None and bad_epochs >= cfg.patience
    while epoch < cfg.epochs and not stopped_early:
        epoch += 1
        model.train()
        batches = _epoch_batches(users, epoch, cfg, rank, world)
        sums: dict[str, Tensor] = {}
        t0 = time.perf_counter()
        for batch in track(batches, f"epoch {epoch}/{cfg.epochs}"):
            x = rows(batch)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                out = step_module(x, step)
            loss = out["loss"]
            if device.type == "cpu" and world == 1 and not torch.isfinite(loss):
                terms = {k: float(v.detach()) for k, v in out.items()}
                rd.log(f"stopped: non-finite loss at epoch {epoch}, step {step}: {_fmt(terms)}", flush=True)
                raise _non_finite(terms, epoch, step, cfg, rd, last_saved)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            for key, value in out.items():
                value = value.detach().float()
                sums[key] = sums[key] + value if key in sums else value.clone()
            if cfg.log_every and step % cfg.log_every == 0:
                rd.log(f"epoch {epoch} step {step}: {_fmt({k: float(v) for k, v in out.items()})}")
        keys = sorted(sums)
        totals = torch.stack([sums[k] for k in keys]) if keys else torch.zeros(0, device=device)
        n_batches = torch.tensor(float(len(batches)), device=totals.device)
        if world > 1:
            dist.all_reduce(totals)
            dist.all_reduce(n_batches)
        terms = {k: float(v) for k, v in zip(keys, (totals / n_batches.clamp(min=1)).tolist())}
        if not all(math.isfinite(v) for v in terms.values()):
            rd.log(f"stopped: non-finite loss in epoch {epoch}: {_fmt(terms)}", flush=True)
            raise _non_finite(terms, epoch, step, cfg, rd, last_saved)
        train_seconds = time.perf_counter() - t0

        t1 = time.perf_counter()
        metrics, value = _valid(model, evaluate_fn, cfg.monitor)
        eval_seconds = time.perf_counter() - t1
        if evaluate_fn is None or value > best_score:
            best_epoch, best_score, bad_epochs = epoch, value, 0
            best_state = _cpu_state(model) if evaluate_fn is not None else None
        else:
            bad_epochs += 1
        stopped_early = cfg.patience is not None and evaluate_fn is not None and bad_epochs >= cfg.patience
        record = {"epoch": epoch, "step": step, "train": terms, "valid": metrics,
                  "lr": optimizer.param_groups[0]["lr"], "train_seconds": train_seconds,
                  "eval_seconds": eval_seconds, "time": time.time()}
        history.append(record)
        valid_note = (f" | valid {cfg.monitor} {value:.4f} (best {best_score:.4f} @ {best_epoch})"
                      if evaluate_fn is not None else "")
        rd.log(f"epoch {epoch}/{cfg.epochs} {_fmt(terms)}{valid_note} | {train_seconds:.2f} s + eval "
               f"{eval_seconds:.2f} s")
        if stopped_early:
            rd.log(f"early stop: no improvement of {cfg.monitor} for {cfg.patience} epochs")
        if cfg.checkpoint_every and epoch % cfg.checkpoint_every == 0 and epoch < cfg.epochs and not stopped_early:
            checkpoint(finished=False)
            last_saved = epoch
        else:
            rd.write_history(history)
            rd.flush_log()
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)

    # -- finish: the best state, a final checkpoint, the result
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    best_valid = next((rec["valid"] for rec in history if rec["epoch"] == best_epoch), {})
    times = [rec["train_seconds"] for rec in history]
    result = TrainResult(best_epoch=best_epoch, best_valid=dict(best_valid), history=history,
                         epochs_run=epoch, stopped_early=stopped_early, resumed_from=resumed_from,
                         seconds_per_epoch=float(np.mean(times)) if times else 0.0)
    rd.log(f"done: best epoch {best_epoch}" + (f", valid {_fmt(best_valid)}" if best_valid else ""))
    checkpoint(finished=True, result=result)
    rd.write_json("train_result.json", result.summary())
    if world > 1:
        dist.barrier()
    return result
