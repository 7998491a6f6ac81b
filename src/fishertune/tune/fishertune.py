"""FisherTune: Fisher-guided progressive fine-tuning of any ``nn.Module`` (Zhao et al., CVPR 2025).

Warm-up epochs train everything. At the end of warm-up, and every ``fim_update_freq`` epochs after,
the tuner estimates the diagonal Fisher ``F(x)`` (and ``F(x')`` on perturbed data), combines them into
the domain-related Fisher (DR-FIM, :mod:`fishertune.tune.drfim`), normalises it within each parameter
group ("shared", "specific") to [0, 1] and lets only entries with importance ``>= delta(t)`` train;
``delta(t)`` moves from the group's ``delta_max`` to ``delta_min`` (:mod:`fishertune.tune.schedule`).
Frozen entries are kept bit-exact by :class:`~fishertune.tune.masking.ParameterMask`. Options:
variational stabilisation, EWC towards the warm-up weights, diagonal / K-FAC natural gradient,
an adaptive threshold scheduler, and an online Fisher from the training gradients.

A training loop drives it (see docs/tune.md)::

    tuner = FisherTuner(model, cfg, {"shared": ["enc.*"], "specific": ["dom*"]}, fisher_fn, batches)
    opt = tuner.make_optimizer("adam")
    for epoch in range(E):
        tuner.on_epoch_start(epoch)
        for batch in train:
            opt.zero_grad(); (loss(batch) + tuner.penalty()).backward()
            tuner.before_step(); opt.step(); tuner.after_step()
        tuner.on_epoch_end(epoch, {"valid_loss": v})

``penalty()`` is the EWC term's value, without a graph: ``before_step`` adds its gradient
``strength * F * (theta - theta*)`` itself with ``torch._foreach_*`` ops (the same gradient as
back-propagating the penalty, far cheaper), so adding the value to the loss only makes the logged loss
include it. ``penalty(differentiable=True)`` is the autograd version for a caller who back-propagates
it; ``before_step`` then adds nothing for that step. Per-step work uses foreach ops (EWC, diagonal
natural gradient, online Fisher) and never reads a value back from the device.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
import time
import warnings
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from fishertune.config import StrictModel
from fishertune.fisher import DiagonalNaturalGradient, KFACOptimizer, diagonal_fisher
from fishertune.fisher.kfac import KFACBlock
from fishertune.tune.drfim import (dr_fim, group_scales, masks_from_importance, normalize_importance, posterior_std,
                                   quantile_summary, variational_floor)
from fishertune.tune.masking import ParameterMask
from fishertune.tune.perturb import Combined, FeatureShift, NoiseInjection, Perturbation
from fishertune.tune.regularize import EWCGradient, OnlineFisher, ewc_penalty
from fishertune.tune.schedule import AdaptiveOffset, delta_at
from fishertune.utils.foreach import to_floats

__all__ = ["FisherTuneConfig", "FisherFn", "engine_fisher", "batch_gradient_fisher", "FisherTuner",
           "build_perturbation", "resolve_groups", "GROUP_NAMES"]

GROUP_NAMES = ("shared", "specific")
FisherFn = Callable[[nn.Module, Iterable[Any]], dict[str, Tensor]]
PerturbationType = Literal["none", "edge_dropout", "popularity", "noise", "feature_shift", "combined"]
DEFAULT_SPAN = 20


class FisherTuneConfig(StrictModel):
    """Every FisherTune option (flat keys; ``fishertune.<key>=value`` overrides). See docs/tune.md."""

    use_fishertune: bool = True
    fishertune_warmup: int = Field(5, ge=0)
    # learning rate / weight decay per group (applied by make_optimizer also when use_fishertune=false)
    shared_lr: float = Field(1e-3, gt=0)
    specific_lr: float = Field(1e-3, gt=0)
    shared_weight_decay: float = Field(0.0, ge=0)
    specific_weight_decay: float = Field(0.0, ge=0)
    # progressive selection: importance >= delta(t) trains; delta goes delta_max -> delta_min
    shared_delta_min: float = Field(0.5, ge=0, le=1)
    shared_delta_max: float = Field(0.9, ge=0, le=1)
    specific_delta_min: float = Field(0.1, ge=0, le=1)
    specific_delta_max: float = Field(0.5, ge=0, le=1)
    threshold_schedule: Literal["linear", "cosine"] = "linear"
    schedule_epochs: int = Field(0, ge=0)          # 0: the rest of training (needs total_epochs)
    importance_normalization: Literal["rank", "max"] = "rank"
    # DR-FIM and perturbations
    perturbation_type: PerturbationType = "none"
    edge_dropout_rate: float = Field(0.1, ge=0, lt=1)
    popularity_alpha: float = Field(0.5, ge=0, le=10)
    perturbation_noise_std: float = Field(0.1, ge=0)
    feature_shift_mu: float = Field(0.1, ge=0)
    feature_shift_sigma: float = Field(0.1, ge=0)
    perturbation_modules: list[str] = Field(default_factory=list)   # glob patterns (noise / feature_shift)
    fisher_scale: Literal["mean", "raw"] = "mean"
    drfim_eps: float = Field(1e-8, gt=0)
    # variational Fisher
    use_variational: bool = False
    variational_tau: float = Field(0.01, gt=0)
    variational_gamma: float = Field(0.1, gt=0)
    variational_samples: int = Field(1, ge=0)
    use_adaptive_vi: bool = False
    tau_decay: float = Field(0.95, gt=0, le=1)
    gamma_growth: float = Field(1.05, ge=1)
    variational_tau_min: float = Field(1e-4, gt=0)
    variational_gamma_max: float = Field(1.0, gt=0)
    # natural gradient
    use_natural_gradient: bool = False
    natural_gradient: Literal["diagonal", "kfac"] = "diagonal"
    fisher_damping: float = Field(1e-3, gt=0)
    natural_gradient_rescale_moments: bool = True    # keep the optimizer's moments consistent (K-FAC: diagonal)
    natural_gradient_precondition_decay: bool = True   # precondition the optimizer's L2 term too
    kfac_update_freq: int = Field(10, ge=1)
    kfac_decay: float = Field(0.95, ge=0, lt=1)
    # EWC
    use_fisher_regularization: bool = False
    fisher_reg_strength: float = Field(1.0, ge=0)
    # adaptive scheduler
    use_adaptive_scheduler: bool = False
    scheduler_adaptation_rate: float = Field(0.05, ge=0, le=1)
    scheduler_metric: str = "valid_loss"
    scheduler_mode: Literal["min", "max"] = "min"
    # Fisher estimation
    fim_update_freq: int = Field(5, ge=1)
    fim_method: Literal["empirical", "batch", "online"] = "empirical"
    fim_batches: int = Field(0, ge=0)               # 0: every batch fisher_batches() yields
    fim_ema_decay: float = Field(0.99, ge=0, lt=1)

    @model_validator(mode="after")
    def _ranges(self) -> "FisherTuneConfig":
        for g in GROUP_NAMES:
            lo, hi = getattr(self, f"{g}_delta_min"), getattr(self, f"{g}_delta_max")
            if lo > hi:
                raise ValueError(f"{g}_delta_min ({lo}) must be <= {g}_delta_max ({hi})")
        if self.variational_tau_min > self.variational_tau:
            raise ValueError(f"variational_tau_min ({self.variational_tau_min}) must be <= variational_tau "
                             f"({self.variational_tau})")
        if self.variational_gamma_max < self.variational_gamma:
            raise ValueError(f"variational_gamma_max ({self.variational_gamma_max}) must be >= variational_gamma "
                             f"({self.variational_gamma})")
        return self


# ---------------------------------------------------------------------------------------------- Fisher fns
def engine_fisher(likelihood: Any, batch_to_inputs: Callable[[Any], tuple[tuple, Tensor]] | None = None,
                  output_transform: Callable[[Any], Tensor] | None = None, kind: str = "empirical",
                  **kw: Any) -> FisherFn:
    """A :data:`FisherFn` running :func:`fishertune.fisher.diagonal_fisher` (per-sample gradients by
    layer hooks); extra keywords go to it (``params=``, ``n_samples=``, ``max_batches=`` ...)."""
    kw.setdefault("progress", False)

    def fn(model: nn.Module, batches: Iterable[Any]) -> dict[str, Tensor]:
        res = diagonal_fisher(model, batches, likelihood=likelihood, kind=kind, batch_to_inputs=batch_to_inputs,
                              output_transform=output_transform, **kw)
        return dict(res.fisher)

    return fn


def _batch_size(batch: Any) -> int:
    for leaf in tree_flatten(batch)[0]:
        if isinstance(leaf, Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return 1


def batch_gradient_fisher(loss_fn: Callable[[nn.Module, Any], Tensor],
                          batch_size_fn: Callable[[Any], int] | None = None,
                          train_mode: bool = False) -> FisherFn:
    """A cheap :data:`FisherFn`: ``B * g_batch^2`` averaged over batches, ``g_batch`` the gradient of
    ``loss_fn(model, batch)`` (a mean over the batch's ``B`` samples; ``B`` from ``batch_size_fn`` or
    the first tensor's leading size). With independent per-sample gradients ``E[B g_batch^2]`` is the
    per-sample empirical Fisher plus ``(B - 1)`` times the squared mean gradient, so it is exact only
    near a stationary point; one backward per batch. ``.grad`` is left untouched; the model runs in
    eval mode unless ``train_mode``."""

    def fn(model: nn.Module, batches: Iterable[Any]) -> dict[str, Tensor]:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not params:
            raise ValueError(f"{type(model).__name__} has no trainable parameters")
        acc = {n: torch.zeros_like(p, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
               for n, p in params.items()}
        modes = [(m, m.training) for m in model.modules()]
        n_batches = 0
        try:
            model.train(train_mode)
            for batch in batches:
                loss = loss_fn(model, batch)
                if not isinstance(loss, Tensor) or loss.dim() != 0:
                    raise ValueError("loss_fn must return a scalar tensor (the mean loss of the batch)")
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                B = batch_size_fn(batch) if batch_size_fn is not None else _batch_size(batch)
                for (n, _), g in zip(params.items(), grads):
                    if g is not None:
                        g = g.to_dense() if g.is_sparse else g
                        acc[n].addcmul_(g.to(acc[n].dtype), g.to(acc[n].dtype), value=float(B))
                n_batches += 1
        finally:
            for m, t in modes:
                m.training = t
        if n_batches == 0:
            raise ValueError("batch_gradient_fisher: the batches yielded nothing")
        return {n: t / n_batches for n, t in acc.items()}

    return fn


# ---------------------------------------------------------------------------------------------- helpers
def resolve_groups(model: nn.Module, groups: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Group name -> trainable parameter names, from glob patterns (``fnmatch`` on parameter names).
    Every trainable parameter must fall in exactly one group, and every group must match something."""
    unknown = [g for g in groups if g not in GROUP_NAMES]
    if unknown:
        raise ValueError(f"unknown parameter group(s) {unknown}; FisherTune groups are {list(GROUP_NAMES)}")
    if not groups:
        raise ValueError("groups is empty: give {'shared': [patterns], 'specific': [patterns]}")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    pats = {g: ([v] if isinstance(v, str) else list(v)) for g, v in groups.items()}
    out: dict[str, list[str]] = {g: [] for g in pats}
    uncovered, ambiguous = [], []
    for n in names:
        hits = [g for g, ps in pats.items() if any(fnmatch.fnmatchcase(n, p) for p in ps)]
        if not hits:
            uncovered.append(n)
        elif len(hits) > 1:
            ambiguous.append(f"{n} ({', '.join(hits)})")
        else:
            out[hits[0]].append(n)
    problems = []
    if uncovered:
        problems.append(f"parameters in no group: {uncovered}")
    if ambiguous:
        problems.append(f"parameters in several groups: {ambiguous}")
    empty = [g for g, ns in out.items() if not ns]
    if empty:
        problems.append(f"group(s) {empty} match no trainable parameter (patterns {[pats[g] for g in empty]}; "
                        f"names are e.g. {names[:8]})")
    if problems:
        raise ValueError("FisherTune groups: " + "; ".join(problems))
    return out


def build_perturbation(config: FisherTuneConfig, model: nn.Module | None = None,
                       data_parts: Sequence[Perturbation] = ()) -> Perturbation | None:
    """The core's perturbations from the config: ``noise`` and ``feature_shift`` on the modules
    ``perturbation_modules``; ``combined``: ``data_parts`` (e.g. the recommender's edge dropout and
    popularity reweighting, built in fishertune.recsys) plus noise (std > 0) and feature shift (sizes > 0
    and modules given). ``none`` -> None. ``edge_dropout`` / ``popularity`` are data-level perturbations
    of the recommender and must be passed to :class:`FisherTuner` as ``perturbation=``."""
    t = config.perturbation_type
    mods = config.perturbation_modules
    if t == "none":
        return None
    if t in ("edge_dropout", "popularity"):
        raise ValueError(f"perturbation_type={t!r} is a recommender (data-level) perturbation built in "
                         "fishertune.recsys; pass it to FisherTuner as perturbation=")
    if t in ("noise", "feature_shift") and not mods:
        raise ValueError(f"perturbation_type={t!r} needs perturbation_modules (glob patterns of the modules whose "
                         "outputs are perturbed), or a Perturbation passed as perturbation=")
    if t == "noise":
        return NoiseInjection(mods, config.perturbation_noise_std)
    if t == "feature_shift":
        return FeatureShift(mods, config.feature_shift_mu, config.feature_shift_sigma)
    parts = list(data_parts)
    if mods and config.perturbation_noise_std > 0:
        parts.append(NoiseInjection(mods, config.perturbation_noise_std))
    if mods and (config.feature_shift_mu > 0 or config.feature_shift_sigma > 0):
        parts.append(FeatureShift(mods, config.feature_shift_mu, config.feature_shift_sigma))
    if not parts:
        raise ValueError("perturbation_type='combined' has nothing to combine: give perturbation_modules and/or "
                         "data-level parts (the recommender's edge dropout / popularity)")
    return Combined(parts)


class _NoStep(torch.optim.Optimizer):
    """An optimizer whose step does nothing: lets the K-FAC / diagonal wrappers precondition gradients
    in ``before_step`` while the real optimizer steps later (after masking)."""

    def __init__(self, params: Iterable[nn.Parameter]):
        super().__init__(list(params), {})

    def step(self, closure=None):  # noqa: ARG002
        return None


def _to_cpu(d: Mapping[str, Tensor] | None) -> dict[str, Tensor] | None:
    return None if d is None else {n: t.detach().cpu().clone() for n, t in d.items()}


# ---------------------------------------------------------------------------------------------- tuner
class FisherTuner:
    """FisherTune around a training loop (see the module docstring for the call protocol).

    ``groups``: ``{"shared": [globs], "specific": [globs]}`` over parameter names; every trainable
    parameter in exactly one group. ``fisher_fn(model, batches) -> {name: F}`` estimates the diagonal
    Fisher (:func:`engine_fisher` or :func:`batch_gradient_fisher`); ``fisher_batches()`` returns a fresh
    iterable of batches each call. ``perturbation``: the data/model perturbation for ``F(x')`` (built
    from the config by :func:`build_perturbation` when None). ``total_epochs``: the length of training,
    so that ``delta`` reaches ``delta_min`` at the last epoch (else ``schedule_epochs``). Epoch numbers
    are counted from the first one passed to :meth:`on_epoch_start` (0- or 1-based both work).
    """

    def __init__(self, model: nn.Module, config: FisherTuneConfig, groups: Mapping[str, Sequence[str]],
                 fisher_fn: FisherFn, fisher_batches: Callable[[], Iterable[Any]],
                 perturbation: Perturbation | None = None, seed: int = 0,
                 log: Callable[[str], None] | None = print, total_epochs: int | None = None):
        if not isinstance(config, FisherTuneConfig):
            raise TypeError(f"config must be a FisherTuneConfig, got {type(config).__name__}")
        self.model, self.config, self.seed, self.log = model, config, int(seed), log
        self.fisher_fn, self.fisher_batches = fisher_fn, fisher_batches
        self.groups = resolve_groups(model, groups)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.group_of = {n: g for g, ns in self.groups.items() for n in ns}
        self.total_epochs = total_epochs
        self.enabled = bool(config.use_fishertune)
        self.mask = ParameterMask(model)
        if self.enabled and config.perturbation_type != "none":
            self.perturbation = perturbation if perturbation is not None else build_perturbation(config, model)
        else:
            self.perturbation = None
        self.tau, self.gamma = config.variational_tau, config.variational_gamma
        self.adaptive = AdaptiveOffset(config.scheduler_adaptation_rate, config.scheduler_mode)
        self.online = OnlineFisher(self.params, config.fim_ema_decay) \
            if self.enabled and config.fim_method == "online" else None
        self.kfac: KFACOptimizer | None = None
        self.dng: DiagonalNaturalGradient | None = None
        self._kfac_params: set[str] = set()
        if self.enabled and config.use_natural_gradient and config.natural_gradient == "kfac":
            # bound to make_optimizer's optimizer once it exists (moment rescaling, decay preconditioning)
            self.kfac = KFACOptimizer(model, _NoStep(self.params.values()), damping=config.fisher_damping,
                                      update_freq=config.kfac_update_freq, decay=config.kfac_decay,
                                      rescale_moments=config.natural_gradient_rescale_moments,
                                      precondition_decay=config.natural_gradient_precondition_decay)
            for mname, m in self.kfac.mods.items():
                prefix = mname + "." if mname else ""
                self._kfac_params |= {prefix + n for n, p in m.named_parameters(recurse=False) if p.requires_grad}
        # state
        self.first_epoch: int | None = None
        self.update_count = 0
        self.last_update_t: int | None = None
        self.phase = "off" if not self.enabled else "warmup"
        self.thresholds: dict[str, float] = {g: 0.0 for g in self.groups}
        self._importance: dict[str, Tensor] | None = None
        self.fisher: dict[str, Tensor] | None = None         # latest F(x) (raw): natural gradient, reports
        self.anchor: dict[str, Tensor] | None = None         # warm-up weights (EWC)
        self.anchor_fisher: dict[str, Tensor] | None = None  # F(x) at the end of warm-up (EWC)
        self._summary: dict[str, dict[str, float]] = {}
        self._updated_this_epoch = False
        self._warned: set[str] = set()
        self.history: list[dict[str, Any]] = []
        # per-step caches, rebuilt when what they derive from changes (see _ewc_term / _precondition)
        self._ewc: tuple[tuple, EWCGradient] | None = None
        self._ewc_in_graph = False
        self.optimizer: torch.optim.Optimizer | None = None   # the one make_optimizer built

    # ------------------------------------------------------------------ optimizer
    def make_optimizer(self, name: str = "adam", **kw: Any) -> torch.optim.Optimizer:
        """An optimizer with one parameter group per FisherTune group (``shared_lr`` /
        ``shared_weight_decay`` etc.); ``kw`` go to the optimizer (betas, momentum ...)."""
        classes = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
                   "rmsprop": torch.optim.RMSprop, "adagrad": torch.optim.Adagrad}
        if name not in classes:
            raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(classes)}")
        clash = [k for k in ("lr", "weight_decay") if k in kw]
        if clash:
            raise ValueError(f"{clash} come from the FisherTune config (shared_lr, specific_lr, "
                             "shared_weight_decay, specific_weight_decay)")
        cfg = self.config
        param_groups = [{"params": [self.params[n] for n in names], "name": g,
                         "lr": getattr(cfg, f"{g}_lr"), "weight_decay": getattr(cfg, f"{g}_weight_decay")}
                        for g, names in self.groups.items()]
        self.optimizer = classes[name](param_groups, **kw)
        for wrapper in (self.dng, self.kfac):
            if wrapper is not None:
                wrapper.optimizer = self.optimizer
        return self.optimizer

    # ------------------------------------------------------------------ epochs
    def _span(self) -> int:
        cfg = self.config
        if cfg.schedule_epochs > 0:
            return cfg.schedule_epochs
        if self.total_epochs is not None:
            return max(1, self.total_epochs - cfg.fishertune_warmup)
        if "span" not in self._warned:
            self._warned.add("span")
            warnings.warn(f"FisherTune: neither schedule_epochs nor total_epochs is set; delta reaches delta_min "
                          f"after {DEFAULT_SPAN} tuning epochs", RuntimeWarning, stacklevel=3)
        return DEFAULT_SPAN

    def _tune_index(self, epoch: int) -> int:
        if self.first_epoch is None:
            self.first_epoch = int(epoch)
        return int(epoch) - self.first_epoch - self.config.fishertune_warmup

    def on_epoch_start(self, epoch: int) -> None:
        """Warm-up: everything trains. Tuning: re-estimate the Fisher when due, then set the masks for
        this epoch's thresholds."""
        self._updated_this_epoch = False
        if not self.enabled:
            return
        t = self._tune_index(epoch)
        cfg = self.config
        if t < 0:
            self.phase = "warmup"
            self.thresholds = {g: 0.0 for g in self.groups}
            if self.mask.ratio() < 1.0:
                self.mask.set({})
            return
        self.phase = "tune"
        if cfg.use_variational and cfg.use_adaptive_vi and t > 0:
            self.tau = max(cfg.variational_tau_min, self.tau * cfg.tau_decay)
            self.gamma = min(cfg.variational_gamma_max, self.gamma * cfg.gamma_growth)
        due = self._importance is None or self.last_update_t is None or \
            (t - self.last_update_t) >= cfg.fim_update_freq
        if due:
            self._update_fisher(epoch, t)
        span = self._span()
        self.thresholds = {g: self.adaptive.apply(delta_at(t, span, getattr(cfg, f"{g}_delta_max"),
                                                           getattr(cfg, f"{g}_delta_min"), cfg.threshold_schedule))
                           for g in self.groups}
        assert self._importance is not None
        self.mask.set(masks_from_importance(self._importance, self.groups, self.thresholds))

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float] | None = None) -> dict[str, Any]:
        """Adaptive scheduler step (tuning phase) and the epoch's log row."""
        cfg = self.config
        if self.enabled and self.phase == "tune" and cfg.use_adaptive_scheduler:
            if metrics is not None and cfg.scheduler_metric in metrics:
                self.adaptive.update(float(metrics[cfg.scheduler_metric]))
            elif "metric" not in self._warned:
                self._warned.add("metric")
                warnings.warn(f"FisherTune: use_adaptive_scheduler needs metrics[{cfg.scheduler_metric!r}] in "
                              "on_epoch_end; thresholds are not adapted", RuntimeWarning, stacklevel=2)
        row = self._row(epoch)
        self.history.append(row)
        if self.enabled and self.log is not None:
            self.log(self._line(row))
        return row

    def _row(self, epoch: int) -> dict[str, Any]:
        active = self.mask.active_count()
        total = self.mask.total_count()
        row: dict[str, Any] = {"epoch": int(epoch), "phase": self.phase,
                               "threshold": {g: float(self.thresholds.get(g, 0.0)) for g in self.groups},
                               "active": {}, "active_elements": {}, "total": {}, "total_elements": {}, "ratio": {}}
        all_act = all_tot = 0
        for g, names in self.groups.items():
            a = sum(active[n] for n in names)
            s = sum(total[n] for n in names)
            row["active"][g] = sum(1 for n in names if active[n] > 0)
            row["total"][g] = len(names)
            row["active_elements"][g] = a
            row["total_elements"][g] = s
            row["ratio"][g] = a / s if s else 0.0
            all_act, all_tot = all_act + a, all_tot + s
        row["active"]["all"] = sum(row["active"][g] for g in self.groups)
        row["total"]["all"] = len(self.params)
        row["active_elements"]["all"], row["total_elements"]["all"] = all_act, all_tot
        row["ratio"]["all"] = all_act / all_tot if all_tot else 0.0
        row["fisher_updated"] = self._updated_this_epoch
        row["offset"] = self.adaptive.offset
        if self.config.use_variational:
            row["tau"], row["gamma"] = self.tau, self.gamma
        return row

    def _line(self, row: Mapping[str, Any]) -> str:
        thr = sum(row["threshold"].values()) / max(1, len(row["threshold"]))
        per = "; ".join(f"{g}: delta={row['threshold'][g]:.4f}, {row['active'][g]}/{row['total'][g]} tensors, "
                        f"{100 * row['ratio'][g]:.2f}%" for g in self.groups)
        tag = " [warm-up]" if row["phase"] == "warmup" else (" [Fisher updated]" if row["fisher_updated"] else "")
        return (f"[FisherTune] Epoch {row['epoch']}: Threshold={thr:.4f}, Active params={row['active']['all']}, "
                f"Ratio={100 * row['ratio']['all']:.2f}% ({per}){tag}")

    # ------------------------------------------------------------------ Fisher
    def _batches(self, gen: torch.Generator | None, perturb: bool) -> Iterable[Any]:
        it: Iterable[Any] = self.fisher_batches()
        if self.config.fim_batches > 0:
            it = itertools.islice(it, self.config.fim_batches)
        if perturb:
            p = self.perturbation
            assert p is not None and gen is not None
            it = (p.batch(b, gen) for b in it)
        return it

    def _pass(self, gen: torch.Generator | None, perturb: bool) -> dict[str, Tensor]:
        try:
            if perturb:
                assert self.perturbation is not None
                self.perturbation.generator = gen
                with self.perturbation.context(self.model):
                    raw = self.fisher_fn(self.model, self._batches(gen, True))
            else:
                raw = self.fisher_fn(self.model, self._batches(None, False))
        except ValueError as exc:
            raise ValueError(f"FisherTune: estimating the Fisher{' on perturbed data' if perturb else ''} failed: "
                             f"{exc} (check that fisher_batches() yields batches)") from exc
        raw = dict(raw.items())
        out: dict[str, Tensor] = {}
        missing = []
        for n, p in self.params.items():
            t = raw.get(n)
            if t is None:
                missing.append(n)
                t = torch.zeros_like(p, dtype=torch.float32)
            elif tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"fisher_fn returned shape {tuple(t.shape)} for {n!r}, the parameter has "
                                 f"{tuple(p.shape)}")
            out[n] = t.detach().to(p.device, torch.float64 if p.dtype == torch.float64 else torch.float32)
        if missing and "missing" not in self._warned:
            self._warned.add("missing")
            warnings.warn(f"FisherTune: fisher_fn returned no Fisher for {missing[:8]}{'...' if len(missing) > 8 else ''}"
                          "; they count as zero (never selected)", RuntimeWarning, stacklevel=3)
        return out

    def _estimate(self, gen: torch.Generator) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, int]:
        """F(x), F(x') (None without perturbation) and the number of Fisher passes made."""
        cfg = self.config
        perturb = self.perturbation is not None
        passes = 0
        if self.online is not None:
            if self.online.steps == 0:
                raise ValueError("FisherTune: fim_method='online' has no training gradients yet; call "
                                 "tuner.before_step() after every backward (or use a warm-up of >= 1 epoch)")
            fx = {n: t.clone() for n, t in self.online.get().items()}
            fp = None
            if perturb:
                fp, passes = self._pass(gen, True), 1
            return fx, fp, passes
        fx = self._pass(None, False)
        fp = self._pass(gen, True) if perturb else None
        passes = 2 if perturb else 1
        if cfg.use_variational and cfg.variational_samples > 0:
            # average over the posterior mean and K draws theta + s * eps, s = posterior std
            std = {n: posterior_std(fx[n], self.tau, self.gamma) for n in fx}
            saved = {n: p.detach().clone() for n, p in self.params.items()}
            sums_x = {n: t.clone() for n, t in fx.items()}
            sums_p = {n: t.clone() for n, t in fp.items()} if fp is not None else None
            try:
                for _ in range(cfg.variational_samples):
                    with torch.no_grad():
                        for n, p in self.params.items():
                            z = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device, p.dtype)
                            p.add_(z * std[n].to(p.dtype))
                    for n, t in self._pass(None, False).items():
                        sums_x[n].add_(t)
                    passes += 1
                    if sums_p is not None:
                        for n, t in self._pass(gen, True).items():
                            sums_p[n].add_(t)
                        passes += 1
                    with torch.no_grad():
                        for n, p in self.params.items():
                            p.copy_(saved[n])
            finally:
                with torch.no_grad():
                    for n, p in self.params.items():
                        p.copy_(saved[n])
            k = cfg.variational_samples + 1
            fx = {n: t / k for n, t in sums_x.items()}
            fp = {n: t / k for n, t in sums_p.items()} if sums_p is not None else None
        return fx, fp, passes

    def _update_fisher(self, epoch: int, t: int) -> None:
        cfg = self.config
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.update_count)
        fx, fp, passes = self._estimate(gen)
        total = sum(to_floats([v.double().sum() for v in fx.values()]))
        if not math.isfinite(total):
            raise ValueError("FisherTune: the Fisher estimate is not finite (NaN/inf gradients in fisher_batches)")
        if total == 0.0:
            raise ValueError(f"FisherTune: the Fisher is zero for every parameter at epoch {epoch} "
                             f"(warm-up of {cfg.fishertune_warmup} epoch(s)): fisher_batches() yielded no usable "
                             "batch, or the loss has no gradient w.r.t. the parameters (a warm-up that is too "
                             "short for a freshly initialised output layer also gives this)")
        for g, names in self.groups.items():
            if all(x == 0.0 for x in to_floats([fx[n].abs().sum() for n in names])):
                warnings.warn(f"FisherTune: the Fisher of group {g!r} is all zero (its parameters do not affect the "
                              "loss on fisher_batches); the group gets no importance", RuntimeWarning, stacklevel=3)
        scale = group_scales(fx, self.groups) if cfg.fisher_scale == "mean" else None
        floor = variational_floor(self.tau, self.gamma) if cfg.use_variational else 0.0
        magnitude = self.perturbation.magnitude() if self.perturbation is not None else (0.0, 0.0)
        dr, extra = dr_fim(fx, fp, magnitude, scale=scale, floor=floor, eps=cfg.drfim_eps)
        self._importance = normalize_importance(dr, self.groups, cfg.importance_normalization)
        self.fisher = fx
        if self.anchor is None:
            self.anchor = {n: p.detach().clone() for n, p in self.params.items()}
            self.anchor_fisher = {n: f.clone() for n, f in fx.items()}
        if cfg.use_natural_gradient:
            if self.dng is None:
                self.dng = self._make_dng()
            self.dng.set_fisher({n: f for n, f in fx.items() if n not in self._kfac_params})
        self._summary = {}
        for g, names in self.groups.items():
            s: dict[str, float] = {}
            s.update(quantile_summary([fx[n] for n in names], "fisher"))
            if fp is not None:
                s.update(quantile_summary([fp[n] for n in names], "fisher_perturbed"))
            s.update(quantile_summary([dr[n] for n in names], "drfim"))
            s.update(quantile_summary([extra[n] for n in names], "drfim_extra"))
            s["scale"] = float(scale[names[0]]) if scale is not None else 1.0
            self._summary[g] = s
        self.update_count += 1
        self.last_update_t = t
        self._updated_this_epoch = True
        if self.log is not None:
            self.log(f"[FisherTune] Fisher updated at epoch {epoch} ({cfg.fim_method}, {passes} pass(es), "
                     f"perturbation={self.perturbation.name if self.perturbation is not None else 'none'}, "
                     f"{time.perf_counter() - start:.2f}s)")

    def _make_dng(self) -> DiagonalNaturalGradient:
        """The diagonal preconditioner, bound to the optimizer ``make_optimizer`` built (its moments
        rescaled, its L2 decay preconditioned, as the config says); without one, to a no-op optimizer
        (plain division)."""
        cfg = self.config
        opt = self.optimizer if self.optimizer is not None else _NoStep(self.params.values())
        return DiagonalNaturalGradient(self.model, opt, damping=cfg.fisher_damping,
                                       rescale_moments=cfg.natural_gradient_rescale_moments,
                                       precondition_decay=cfg.natural_gradient_precondition_decay)

    # ------------------------------------------------------------------ steps
    def _ewc_on(self) -> bool:
        cfg = self.config
        return (self.enabled and cfg.use_fisher_regularization and self.anchor is not None
                and self.anchor_fisher is not None and cfg.fisher_reg_strength > 0)

    def _ewc_term(self) -> EWCGradient:
        """The EWC gradient helper, rebuilt when the anchor, its Fisher or the strength change."""
        assert self.anchor is not None and self.anchor_fisher is not None
        key = (self.anchor, self.anchor_fisher, float(self.config.fisher_reg_strength))
        # identity of the mappings (kept alive by the key, so an id is never reused), value of the strength
        if self._ewc is None or any(a is not b for a, b in zip(self._ewc[0][:2], key[:2])) \
                or self._ewc[0][2] != key[2]:
            self._ewc = (key, EWCGradient(self.params, self.anchor_fisher, self.anchor,
                                          self.config.fisher_reg_strength))
        return self._ewc[1]

    def penalty(self, differentiable: bool = False) -> Tensor:
        """EWC term ``strength/2 * sum F (theta - theta*)^2`` towards the warm-up weights (0 when off).

        By default its value only, without a graph: :meth:`before_step` adds the penalty's gradient to
        ``.grad`` itself (foreach ops; computed here already, reused there), so ``loss + penalty()``
        logs the full objective and back-propagates only the loss. ``differentiable=True`` returns the
        autograd version (as :func:`~fishertune.tune.regularize.ewc_penalty`) for a caller who
        back-propagates it; the next :meth:`before_step` then leaves the EWC gradient to autograd."""
        if not self._ewc_on():
            some = next(iter(self.params.values()))
            return torch.zeros((), dtype=some.dtype, device=some.device)
        assert self.anchor is not None and self.anchor_fisher is not None
        if differentiable:
            self._ewc_in_graph = True
            return ewc_penalty(self.params, self.anchor_fisher, self.anchor, self.config.fisher_reg_strength)
        return self._ewc_term().value()

    def _precondition(self) -> None:
        """Diagonal natural gradient (:meth:`DiagonalNaturalGradient.precondition`: ``grad /= F + damping``
        with cached denominators, and the L2 decay preconditioned too unless the config says not)."""
        assert self.dng is not None
        self.dng.precondition()

    def before_step(self, batch_size: int | None = None) -> None:
        """After backward, before ``optimizer.step()``, in this order: the EWC gradient (unless
        ``penalty(differentiable=True)`` put it in the graph this step), online Fisher update
        (``batch_size`` scales the squared mean gradient to the per-sample Fisher), natural-gradient
        preconditioning, gradient masking and the snapshot of frozen entries."""
        if not self.enabled:
            return
        in_graph, self._ewc_in_graph = self._ewc_in_graph, False
        if not in_graph and self._ewc_on():
            self._ewc_term().add_to_grads()
        if self.online is not None:
            self.online.update(float(batch_size) if batch_size else 1.0)
        if self.config.use_natural_gradient:
            if self.kfac is not None:
                self.kfac.precondition()
            if self.dng is not None:
                self._precondition()
        self.mask.apply_to_grads()
        self.mask.snapshot()

    def after_step(self) -> None:
        """After ``optimizer.step()``: write the frozen entries back (bit-exact)."""
        if self.enabled:
            self.mask.restore()

    # ------------------------------------------------------------------ reports
    def importance(self) -> dict[str, Tensor]:
        """The last normalised importance per parameter (empty before the first Fisher estimate)."""
        return dict(self._importance) if self._importance is not None else {}

    def fisher_summary(self) -> dict[str, dict[str, float]]:
        """Per group: mean, max and quantiles of F(x), F(x'), DR-FIM and its extra term."""
        return {g: dict(s) for g, s in self._summary.items()}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume mid-training: masks, importance, Fisher, anchor, schedule and
        variational state, online EMA, K-FAC factors, history."""
        kfac = None
        if self.kfac is not None:
            kfac = {"steps": self.kfac.steps,
                    "blocks": {n: {"A": b.A.cpu(), "G": b.G.cpu(), "has_bias": b.has_bias,
                                   "weight_shape": list(b.weight_shape)} for n, b in self.kfac.blocks.items()}}
        return {"version": 1, "enabled": self.enabled, "first_epoch": self.first_epoch,
                "update_count": self.update_count, "last_update_t": self.last_update_t, "phase": self.phase,
                "thresholds": dict(self.thresholds), "tau": self.tau, "gamma": self.gamma,
                "adaptive": self.adaptive.state_dict(), "mask": self.mask.state_dict(),
                "importance": _to_cpu(self._importance), "fisher": _to_cpu(self.fisher),
                "anchor": _to_cpu(self.anchor), "anchor_fisher": _to_cpu(self.anchor_fisher),
                "online": self.online.state_dict() if self.online is not None else None,
                "kfac": kfac, "summary": self.fisher_summary(), "history": list(self.history),
                "warned": sorted(self._warned)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != 1:
            raise ValueError(f"unknown FisherTuner state version {state.get('version')!r}")
        if bool(state["enabled"]) != self.enabled:
            raise ValueError(f"FisherTuner state was saved with use_fishertune={state['enabled']}, the config has "
                             f"{self.enabled}")

        def dev(d: Mapping[str, Tensor] | None) -> dict[str, Tensor] | None:
            if d is None:
                return None
            unknown = [n for n in d if n not in self.params]
            if unknown:
                raise ValueError(f"FisherTuner state names parameters the model lacks: {unknown[:8]}")
            return {n: t.to(self.params[n].device) for n, t in d.items()}

        self.first_epoch = state["first_epoch"]
        self.update_count = int(state["update_count"])
        self.last_update_t = state["last_update_t"]
        self.phase = state["phase"]
        self.thresholds = dict(state["thresholds"])
        self.tau, self.gamma = float(state["tau"]), float(state["gamma"])
        self.adaptive.load_state_dict(state["adaptive"])
        self.mask.load_state_dict(state["mask"])
        self._importance = dev(state["importance"])
        self.fisher = dev(state["fisher"])
        self.anchor = dev(state["anchor"])
        self.anchor_fisher = dev(state["anchor_fisher"])
        if self.online is not None and state["online"] is not None:
            self.online.load_state_dict(state["online"])
        if self.kfac is not None and state["kfac"] is not None:
            self.kfac.steps = int(state["kfac"]["steps"])
            self.kfac.blocks, self.kfac.inverses = {}, {}
            for n, b in state["kfac"]["blocks"].items():
                dev_ = self.kfac.mods[n].weight.device
                blk = KFACBlock(b["A"].to(dev_), b["G"].to(dev_), bool(b["has_bias"]), tuple(b["weight_shape"]))
                self.kfac.blocks[n] = blk
                self.kfac.inverses[n] = blk.inverses(self.kfac.damping, self.kfac.pi)
        if self.config.use_natural_gradient and self.fisher is not None:
            self.dng = self._make_dng()   # the restored optimizer state already matches this Fisher
            self.dng.set_fisher({n: f for n, f in self.fisher.items() if n not in self._kfac_params}, rescale=False)
        self._summary = {g: dict(s) for g, s in state["summary"].items()}
        self.history = list(state["history"])
        self._warned = set(state.get("warned", []))
