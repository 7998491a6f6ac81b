"""Fine-tuning on a few labelled examples, with model selection that survives them and a guard.

Why k-fold: with 100 images a 20-image validation split cannot rank learning rates or stopping points
(every recipe scores 95-100 % on it in one draw of issue 8's reference run). :func:`finetune_small`
therefore chooses the recipe (learning rate from ``lr_grid`` x epoch) on the *pooled out-of-fold*
predictions of stratified k-fold cross-validation within the labelled set: every labelled example is
predicted once by a model that did not train on it, so each candidate is scored on all 100, and every
candidate is compared with the pretrained model on the *same* 100 examples (a paired comparison, much
less noisy than two independent accuracies). It then retrains on all labelled examples with the chosen
recipe.

The guard: the fine-tuned model is kept only when its pooled out-of-fold accuracy beats the untouched
model's accuracy on the same examples by more than ``guard_margin``; otherwise the pretrained weights
are restored and :attr:`FitResult.message` says so. Because the winner of a grid search is optimistic
(the maximum of noisy scores), ``guard_resplit`` scores the chosen recipe again on a fresh fold
assignment, and the guard uses that score. Label-free strategies (``bn_adapt`` only) are scored on all
labelled examples directly (they never see the labels).

Other selection modes: ``holdout`` (a stratified train/validation split, early stopping with
``patience``; right when the labelled set is large, e.g. all 5,000 images), ``fixed`` (a recipe chosen
in advance, no guard) and ``fixed_guarded`` (the fixed recipe; k-fold only to evaluate the guard).

The training loop: SGD (Nesterov) or AdamW with per-parameter lr scales, cosine schedule with linear
warm-up, gradient clipping, weight decay, augmentation hooks (``crop``, ``flip``, ``rot180``,
``rotation:D``, ``noise:S`` or any callable), BatchNorm kept in eval mode by default (``bn_mode:
frozen``: 32-image batch statistics are worse than the pretrained ones), seeded generators; the
strategy adds a Fisher mask (:class:`~fishertune.tune.masking.ParameterMask`), an L2-SP/EWC anchor,
pseudo-labels or entropy on unlabelled inputs, or FisherTune's progressive selection: a
:class:`~fishertune.tune.fishertune.FisherTuner` per training run (every fold, lr and the final run)
decides each epoch which entries train (head-only warm-up, then Fisher / DR-FIM on that run's labelled
training part and thresholds from ``delta_max`` to ``delta_min``), inside the same selection and guard.
"""

from __future__ import annotations

import copy
import glob
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from fishertune.config import ConfigError, StrictModel, deep_merge, validate
from fishertune.tune.fishertune import (
    FisherTuneConfig,
    FisherTuner,
    batch_gradient_fisher,
    engine_fisher,
)
from fishertune.tune.perturb import Perturbation, check_range, match_modules
from fishertune.tune.regularize import ewc_penalty
from fishertune.tune.strategies import (
    Rule,
    StrategyConfig,
    TrainableReport,
    apply,
    fishertune_config,
    get_strategy,
    narrow_report,
    select_rule,
)

Inputs = Tensor | Mapping[str, Tensor]
Transform = Callable[[Inputs, bool, torch.Generator | None], Inputs]

AUGMENTATIONS = ("crop", "flip", "rot180", "rotation", "noise")


class TrainConfig(StrictModel):
    """The small-data recipe (see the module docstring)."""

    epochs: int = Field(20, ge=0)
    steps_per_epoch: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    lr_grid: list[float] = Field(default_factory=list)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    clip_grad: float | None = Field(5.0, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    augment: list[str] = Field(default_factory=lambda: ["crop", "flip"])
    bn_mode: Literal["frozen", "train"] = "frozen"
    selection: Literal["kfold", "holdout", "fixed", "fixed_guarded"] = "kfold"
    folds: int = Field(5, ge=2)
    holdout: float = Field(0.2, gt=0, lt=1)
    patience: int | None = Field(None, ge=1)
    guard: bool = True
    guard_margin: float = Field(0.0, ge=0, le=1)
    guard_resplit: bool = True
    eval_batch_size: int = Field(500, ge=1)
    seed: int = 0

    @field_validator("augment")
    @classmethod
    def _aug(cls, v: list[str]) -> list[str]:
        for spec in v:
            name, _, arg = spec.partition(":")
            if name not in AUGMENTATIONS:
                raise ValueError(f"unknown augmentation {spec!r}; choose from {AUGMENTATIONS} (e.g. noise:0.03)")
            if arg:
                float(arg)
        return v

    def grid(self) -> list[float]:
        return list(self.lr_grid) or [self.lr]


def resolve_train(config: TrainConfig | Mapping[str, Any] | None, strategy: StrategyConfig) -> TrainConfig:
    """The strategy's ``train`` overrides merged onto the base recipe (strict; errors name the key)."""
    base = (config.model_dump() if isinstance(config, TrainConfig) else dict(config or {}))
    return validate(TrainConfig, deep_merge(base, strategy.train), source=f"strategy {strategy.name}: train")


# --- data helpers ------------------------------------------------------------------------------------


def _take(x: Inputs, idx: Tensor) -> Inputs:
    if isinstance(x, Mapping):
        return {k: v[idx.to(v.device)] for k, v in x.items()}
    return x[idx.to(x.device)]


def _len(x: Inputs) -> int:
    return len(next(iter(x.values()))) if isinstance(x, Mapping) else len(x)


def _to(x: Inputs, device: torch.device) -> Inputs:
    if isinstance(x, Mapping):
        return {k: v.to(device) for k, v in x.items()}
    return x.to(device)


def _forward(model: nn.Module, x: Inputs) -> Tensor:
    return model(**x) if isinstance(x, Mapping) else model(x)


def augmentation(specs: Sequence[str | Callable]) -> Callable[[Tensor, torch.Generator | None], Tensor]:
    """Compose augmentation specs (names from :data:`AUGMENTATIONS`, ``name:arg``, or callables
    ``f(x, generator)``) into one function of float images ``(N, C, H, W)`` in [0, 1]."""
    from fishertune.zoo import cifar_jpeg as cj

    fns: list[Callable[[Tensor, torch.Generator | None], Tensor]] = []
    for spec in specs:
        if callable(spec):
            fns.append(spec)
            continue
        name, _, arg = spec.partition(":")
        if name == "crop":
            pad = int(float(arg)) if arg else 4
            fns.append(lambda x, g, pad=pad: cj.random_crop(x, pad, generator=g))
        elif name == "flip":
            fns.append(lambda x, g: cj.random_hflip(x, generator=g))
        elif name == "rot180":
            fns.append(lambda x, g: cj.rotate(x, 180))
        elif name == "rotation":
            deg = float(arg) if arg else 15.0
            fns.append(lambda x, g, deg=deg: cj.random_rotation(x, deg, generator=g))
        elif name == "noise":
            std = float(arg) if arg else 0.03
            fns.append(lambda x, g, std=std: cj.gaussian_noise(x, std, generator=g))
        else:
            raise ValueError(f"unknown augmentation {spec!r}; choose from {AUGMENTATIONS}")

    def run(x: Tensor, g: torch.Generator | None) -> Tensor:
        for f in fns:
            x = f(x, g)
        return x
    return run


def image_transform(augment: Sequence[str | Callable] = ("crop", "flip")) -> Transform:
    """uint8 images -> (augmented when training) -> normalised with the pretrained models' statistics."""
    from fishertune.zoo.cifar_jpeg import normalize

    aug = augmentation(augment)

    def transform(x: Inputs, train: bool, g: torch.Generator | None) -> Inputs:
        assert isinstance(x, Tensor)
        xf = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if train:
            xf = aug(xf, g)
        return normalize(xf)
    return transform


def identity_transform(x: Inputs, train: bool, g: torch.Generator | None) -> Inputs:
    """For pre-tokenised inputs (no augmentation)."""
    return x


def stratified_folds(labels: Tensor, k: int, seed: int) -> list[Tensor]:
    """k disjoint index sets covering ``labels``, each class spread evenly over them (seeded)."""
    lab = labels.cpu()
    if k > len(lab):
        raise ValueError(f"{k} folds need at least {k} examples, got {len(lab)}")
    g = torch.Generator().manual_seed(int(seed))
    folds: list[list[int]] = [[] for _ in range(k)]
    offset = 0
    for c in torch.unique(lab).tolist():
        idx = torch.nonzero(lab == c).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        for j, i in enumerate(idx.tolist()):
            folds[(offset + j) % k].append(i)
        offset += len(idx)
    return [torch.tensor(sorted(f), dtype=torch.long) for f in folds]


@torch.no_grad()
def predict(model: nn.Module, x: Inputs, transform: Transform, batch_size: int = 500) -> Tensor:
    """Logits of ``model`` in eval mode (restored afterwards) on all of ``x``."""
    was = model.training
    model.eval()
    out = []
    for s in range(0, _len(x), batch_size):
        idx = torch.arange(s, min(s + batch_size, _len(x)))
        out.append(_forward(model, transform(_take(x, idx), False, None)).float())
    model.train(was)
    return torch.cat(out) if out else torch.empty(0)


def count_correct(model: nn.Module, x: Inputs, y: Tensor, transform: Transform, batch_size: int = 500) -> int:
    if _len(x) == 0:
        return 0
    return int((predict(model, x, transform, batch_size).argmax(1) == y.to(_device(model))).sum())


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


# --- BatchNorm adaptation ----------------------------------------------------------------------------


def _bn_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, x: Inputs, transform: Transform, alpha: float = 1.0,
                    batch_size: int = 256) -> list[str]:
    """Mix every BatchNorm layer's running statistics with those of ``x`` (no labels, no gradients):
    ``(1 - alpha) * source + alpha * target``. Target statistics are the exact mean and unbiased
    variance of each layer's input over all of ``x`` (sums over batches, whatever their sizes), with
    each batch normalised by its own statistics on the way, as in training. Only running statistics
    change (and ``num_batches_tracked``). Returns the names of those buffers."""
    layers = _bn_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer with running statistics to adapt")
    if _len(x) == 0:
        raise ValueError("adapt_batchnorm: no images given")
    sums: dict[str, list] = {n: [0, 0.0, 0.0] for n, _ in layers}

    def hook(name: str):
        def pre(module: nn.Module, args: tuple) -> None:
            h = args[0].detach().double()
            dims = [0, *range(2, h.dim())]
            acc = sums[name]
            acc[0] += h.numel() // h.shape[1]
            acc[1] = acc[1] + h.sum(dims)
            acc[2] = acc[2] + (h * h).sum(dims)
        return pre

    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers]
    try:
        model.eval()
        for _, m in layers:
            m.train()
        tracked = {n: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                   for n, m in layers}
        for s in range(0, _len(x), batch_size):
            idx = torch.arange(s, min(s + batch_size, _len(x)))
            _forward(model, transform(_take(x, idx), False, None))
    finally:
        for h in handles:
            h.remove()
        for m, t in modes:
            m.training = t
    for n, m in layers:
        mean0, var0, nbt = tracked[n]
        count, s1, s2 = sums[n]
        mean = s1 / count
        var = (s2 - count * mean * mean) / max(count - 1, 1)
        m.running_mean.copy_((1 - alpha) * mean0 + alpha * mean.to(mean0.dtype))
        m.running_var.copy_((1 - alpha) * var0 + alpha * var.clamp_min(0).to(var0.dtype))
        m.num_batches_tracked.copy_(nbt + (_len(x) + batch_size - 1) // batch_size)
    out = []
    for n, _ in layers:
        out += [f"{n}.{b}" if n else b for b in ("running_mean", "running_var", "num_batches_tracked")]
    return out


# --- results -----------------------------------------------------------------------------------------


@dataclass
class FitResult:
    """Outcome of :func:`finetune_small`. ``kept_base``: the guard restored the pretrained model.
    ``base_correct`` / ``chosen_correct`` of ``n_scored``: what the guard compared. ``curves``: pooled
    correct counts per lr and epoch (0 = before training)."""

    strategy: str
    lr: float | None
    epochs: int
    kept_base: bool
    message: str
    base_correct: int
    chosen_correct: int
    n_scored: int
    report: TrainableReport
    selection: str
    curves: dict[str, list[int]] = field(default_factory=dict)
    seconds: float = 0.0
    train_config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "lr": self.lr, "epochs": self.epochs, "kept_base": self.kept_base,
                "message": self.message, "base_correct": self.base_correct, "chosen_correct": self.chosen_correct,
                "n_scored": self.n_scored, "selection": self.selection, "curves": self.curves,
                "seconds": self.seconds, "trainable": self.report.trainable, "total": self.report.total,
                "share": self.report.share, "train_config": self.train_config}


# --- training ----------------------------------------------------------------------------------------


@dataclass
class _Extras:
    """Per-strategy material that does not depend on the labelled fold: adapted BN buffers, teacher
    probabilities on the unlabelled inputs, anchor weights."""

    bn_state: dict[str, Tensor] | None = None
    teacher: Tensor | None = None
    anchor_w: dict[str, Tensor] | None = None


def _set_bn_mode(model: nn.Module, mode: str) -> None:
    model.train()
    if mode == "frozen":
        for _, m in _bn_layers(model):
            m.eval()


def _lr_lambda(total: int, warmup: int, schedule: str) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant" or total <= warmup:
            return 1.0
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


def _train(model: nn.Module, report: TrainableReport, strategy: StrategyConfig, cfg: TrainConfig, lr: float,
           epochs: int, x: Inputs, y: Tensor, transform: Transform, *, unlabelled: Inputs | None,
           extras: _Extras, evals: Sequence[tuple[Inputs, Tensor]] = (), seed: int = 0,
           patience: int | None = None) -> tuple[list[list[int]], dict[str, Tensor] | None, TrainableReport]:
    """Train in place; returns correct counts on each eval set after every epoch (index 0 = before),
    with ``patience`` (first eval set) the state of the best epoch (None without), and the report
    (with FisherTune: narrowed to the entries its masks selected in some epoch)."""
    from fishertune.tune.masking import ParameterMask

    device = _device(model)
    named = dict(model.named_parameters())
    trainable = [n for n in report.lr_scale if named[n].requires_grad]
    curves = [[count_correct(model, ex, ey, transform, cfg.eval_batch_size)] for ex, ey in evals]
    best_state, best, since = None, curves[0][0] if (patience and evals) else -1, 0
    if patience and evals:
        best_state = copy.deepcopy(model.state_dict())
    if not trainable or epochs == 0:
        return curves, best_state, report
    decay, no_decay = cfg.weight_decay, 0.0
    groups = [{"params": [named[n]], "lr": lr * report.lr_scale[n],
               "weight_decay": decay if named[n].dim() > 1 else no_decay} for n in trainable]
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum,
                                                     nesterov=cfg.momentum > 0)
    else:
        opt = torch.optim.AdamW(groups, lr=lr)
    n = _len(x)
    steps = cfg.steps_per_epoch or max(1, math.ceil(n / cfg.batch_size))
    total = steps * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, round(cfg.warmup_epochs * steps),
                                                              cfg.schedule))
    mask = ParameterMask(model, {k: v for k, v in report.masks.items() if k in trainable}) if report.masks else None
    g = torch.Generator().manual_seed(int(seed))
    anchor0 = ({k: named[k].detach().clone() for k in trainable} if strategy.anchor is not None else None)
    if anchor0 is not None:  # per-entry weights of the anchor term: EWC's Fisher, or 1 (L2-SP)
        one = torch.ones((), device=device)
        anchor_w = {k: extras.anchor_w[k] if extras.anchor_w else one for k in trainable}
    train_params = [named[k] for k in trainable]
    pl, ent = strategy.pseudo_label, strategy.entropy
    n_unl = _len(unlabelled) if unlabelled is not None else 0
    if (pl is not None or ent is not None) and n_unl == 0:
        raise ValueError(f"strategy {strategy.name!r} needs unlabelled inputs (pseudo_label / entropy)")
    y = y.to(device)
    tuner = _make_tuner(model, strategy, trainable, x, y, transform, epochs, seed) \
        if strategy.fishertune is not None else None
    selected: dict[str, Tensor] | None = None
    order = torch.empty(0, dtype=torch.long)
    pos = 0
    for epoch in range(epochs):
        if tuner is not None:
            selected = _tuner_epoch_start(tuner, epoch, selected)
            loss_sum = torch.zeros((), device=device)
        _set_bn_mode(model, cfg.bn_mode)
        for _ in range(steps):
            if pos + cfg.batch_size > len(order):
                order = torch.cat([order[pos:], torch.randperm(n, generator=g)])
                pos = 0
            idx = order[pos:pos + min(cfg.batch_size, n)]
            pos += len(idx)
            logits = _forward(model, transform(_take(x, idx), True, g))
            loss = F.cross_entropy(logits, y[idx.to(device)], label_smoothing=cfg.label_smoothing)
            if pl is not None and pl.weight > 0:
                uidx = torch.randint(0, n_unl, (pl.batch_size,), generator=g)
                probs = extras.teacher[uidx.to(extras.teacher.device)].to(device)
                conf, hard = probs.max(1)
                keep = (conf >= pl.threshold).float()
                ulog = _forward(model, transform(_take(unlabelled, uidx), True, g))
                if pl.soft:
                    per = -(probs * F.log_softmax(ulog, 1)).sum(1)
                else:
                    per = F.cross_entropy(ulog, hard, reduction="none")
                loss = loss + pl.weight * (per * keep).mean()
            if ent is not None and ent.weight > 0:
                uidx = torch.randint(0, n_unl, (ent.batch_size,), generator=g)
                ulog = _forward(model, transform(_take(unlabelled, uidx), True, g))
                p = F.softmax(ulog, 1)
                loss = loss + ent.weight * -(p * F.log_softmax(ulog, 1)).sum(1).mean()
            if anchor0 is not None and strategy.anchor.strength > 0:
                loss = loss + ewc_penalty(named, anchor_w, anchor0, strategy.anchor.strength)
            if tuner is not None:
                loss = loss + tuner.penalty()    # EWC value (0 when off); before_step adds its gradient
                loss_sum += loss.detach()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if mask is not None:
                mask.apply_to_grads()
            if tuner is not None:
                tuner.before_step(batch_size=len(idx))   # EWC / natural gradient, masks, snapshot
            if cfg.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(train_params, cfg.clip_grad)
            if mask is not None:
                mask.snapshot()
            opt.step()
            if mask is not None:
                mask.restore()
            if tuner is not None:
                tuner.after_step()
            sched.step()
        if tuner is not None:
            tuner.on_epoch_end(epoch, {"train_loss": float(loss_sum) / steps})
        for c, (ex, ey) in zip(curves, evals):
            c.append(count_correct(model, ex, ey, transform, cfg.eval_batch_size))
        if patience and evals:
            if curves[0][-1] > best:
                best, since = curves[0][-1], 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                since += 1
                if since >= patience:
                    break
    model.eval()
    if selected is not None:
        report = narrow_report(model, report, selected)
    return curves, best_state, report


# --- FisherTune (progressive selection by the FisherTuner) -------------------------------------------


class InputNoise(Perturbation):
    """``x' = x + N(0, std^2)`` on the float model inputs of a Fisher batch: FisherTune's ``noise``
    perturbation for a classifier when no ``perturbation_modules`` are named (magnitude ``(0, std)``)."""

    name = "input_noise"

    def __init__(self, std: float) -> None:
        self.std = check_range("perturbation_noise_std", std, 0.0, math.inf)

    def magnitude(self) -> tuple[float, float]:
        return (0.0, self.std)

    def batch(self, batch: Any, generator: torch.Generator) -> Any:
        inp, target = batch
        if isinstance(inp, Mapping) or not all(t.is_floating_point() for t in inp):
            raise ValueError(_NOISE_INPUTS)
        return tuple(t + self.std * torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)
                     for t in inp), target


_NOISE_INPUTS = ("fishertune: perturbation_type 'noise' without perturbation_modules adds noise to the inputs, "
                 "which must be float tensors (images); for token inputs name modules in perturbation_modules "
                 "(e.g. 'body.*embeddings')")


def _tuner_groups(model: nn.Module, trainable: Sequence[str]) -> dict[str, list[str]]:
    """FisherTune groups for a classifier: ``specific`` = the trainable parameters of the ``head`` role,
    ``shared`` = the other trainable ones (empty groups left out); exact names as glob patterns."""
    try:
        head = set(select_rule(model, Rule(select=["head"])))
    except ConfigError:
        head = set()
    groups = {"shared": [n for n in trainable if n not in head], "specific": [n for n in trainable if n in head]}
    return {g: [glob.escape(n) for n in names] for g, names in groups.items() if names}


def _ce_loss(model: nn.Module, batch: Any) -> Tensor:
    inp, target = _split(batch)
    return F.cross_entropy(model(*inp), target)


def _make_tuner(model: nn.Module, strategy: StrategyConfig, trainable: Sequence[str], x: Inputs, y: Tensor,
                transform: Transform, epochs: int, seed: int) -> FisherTuner:
    """The :class:`FisherTuner` of one training run: groups from :func:`_tuner_groups`, Fisher on this
    run's labelled training inputs without augmentation (``engine_fisher`` for ``fim_method:
    empirical``, ``batch_gradient_fisher`` of the cross-entropy for ``batch`` / ``online``), input
    noise as the ``noise`` perturbation when no modules are named, the schedule spanning ``epochs``."""
    cfg: FisherTuneConfig = fishertune_config(strategy.fishertune or {})
    if cfg.use_fishertune and cfg.perturbation_modules:   # fail now, not after the warm-up
        match_modules(model, cfg.perturbation_modules, "fishertune: perturbation_modules")
    perturbation = None
    if cfg.use_fishertune and cfg.perturbation_type == "noise" and not cfg.perturbation_modules:
        if isinstance(x, Mapping):
            raise ValueError(_NOISE_INPUTS)
        perturbation = InputNoise(cfg.perturbation_noise_std)
    batches = _fisher_batches(model, x, y, transform)
    fisher_fn = (engine_fisher("categorical", batch_to_inputs=_split) if cfg.fim_method == "empirical"
                 else batch_gradient_fisher(_ce_loss, batch_size_fn=lambda b: len(b[1])))
    return FisherTuner(model, cfg, _tuner_groups(model, trainable), fisher_fn, lambda: batches,
                       perturbation=perturbation, seed=seed, log=None, total_epochs=epochs)


def _tuner_epoch_start(tuner: FisherTuner, epoch: int,
                       selected: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
    """``on_epoch_start``; during warm-up only the head (``specific``) trains when there is a body
    (``shared``) too: a fresh or task-shifted head is fitted before the Fisher of the body is read.
    Returns the union of the entries selected so far (None while FisherTune is off)."""
    tuner.on_epoch_start(epoch)
    if not tuner.enabled:
        return None
    if tuner.phase == "warmup" and len(tuner.groups) == 2:
        tuner.mask.set({n: torch.zeros_like(tuner.params[n], dtype=torch.bool) for n in tuner.groups["shared"]})
    now = tuner.mask.masks()
    if selected is None:
        return {n: m.clone() for n, m in now.items()}
    return {n: selected[n] | m for n, m in now.items()}


# --- preparation (strategy-specific setup that precedes training) ------------------------------------


def _prepare(model: nn.Module, base_state: Mapping[str, Tensor], strategy: StrategyConfig, cfg: TrainConfig,
             x: Inputs, y: Tensor, transform: Transform, unlabelled: Inputs | None, extras: _Extras,
             fisher_kind: str = "empirical") -> TrainableReport:
    """Reset to the pretrained weights, adapt BN, compute what the strategy needs, apply it."""
    model.load_state_dict(base_state)
    bn = strategy.bn_adapt
    if bn is not None:
        if bn.source == "labelled" or extras.bn_state is None:
            src = x if bn.source == "labelled" else unlabelled
            if src is None:
                raise ValueError(f"strategy {strategy.name!r}: bn_adapt from unlabelled images, but none given")
            if bn.max_images is not None:
                src = _take(src, torch.arange(min(bn.max_images, _len(src))))
            adapt_batchnorm(model, src, transform, bn.alpha, bn.batch_size)
            if bn.source == "unlabelled":
                extras.bn_state = {k: v.clone() for k, v in model.state_dict().items()
                                   if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}
        else:
            model.load_state_dict(extras.bn_state, strict=False)
    if strategy.pseudo_label is not None and extras.teacher is None:
        extras.teacher = _teacher_probs(model, unlabelled, transform, strategy.pseudo_label.tta, cfg.eval_batch_size)
    if strategy.anchor is not None and strategy.anchor.kind == "ewc" and extras.anchor_w is None:
        extras.anchor_w = _ewc_weights(model, unlabelled, transform, strategy.anchor.fisher_images)
    fisher = None
    if strategy.fish_mask is not None:
        apply(model, strategy.model_copy(update={"fish_mask": None}))
        fisher = _fisher(model, x, y, transform, strategy.fish_mask.kind)
    return apply(model, strategy, fisher=fisher)


@torch.no_grad()
def _teacher_probs(model: nn.Module, x: Inputs | None, transform: Transform, tta: bool, bs: int) -> Tensor:
    if x is None or _len(x) == 0:
        raise ValueError("pseudo_label needs unlabelled inputs")
    p = F.softmax(predict(model, x, transform, bs), 1)
    if tta and isinstance(x, Tensor) and x.dim() == 4:
        p = 0.5 * (p + F.softmax(predict(model, x.flip(-1), transform, bs), 1))
    return p


def _fisher_batches(model: nn.Module, x: Inputs, y: Tensor, transform: Transform,
                    batch_size: int = 64) -> list[tuple[Any, Tensor]]:
    """``(inputs, labels)`` batches of ``x`` as the model sees them (no augmentation), on its device."""
    device = _device(model)
    batches = []
    for s in range(0, _len(x), batch_size):
        idx = torch.arange(s, min(s + batch_size, _len(x)))
        xi = transform(_take(x, idx), False, None)
        batches.append(((xi,) if not isinstance(xi, Mapping) else xi, y[idx.to(y.device)].to(device)))
    return batches


def _split(batch: tuple[Any, Tensor]) -> tuple[tuple, Tensor]:
    inp, target = batch
    return (inp if isinstance(inp, tuple) else tuple(inp.values())), target


def _fisher(model: nn.Module, x: Inputs, y: Tensor, transform: Transform, kind: str,
            batch_size: int = 64) -> dict[str, Tensor]:
    from fishertune.fisher import diagonal_fisher

    res = diagonal_fisher(model, _fisher_batches(model, x, y, transform, batch_size), likelihood="categorical",
                          kind=kind, batch_to_inputs=_split, progress=False)
    return dict(res.fisher)


def _ewc_weights(model: nn.Module, x: Inputs | None, transform: Transform, n: int) -> dict[str, Tensor]:
    """Diagonal Fisher of the pretrained model (labels sampled from it) on up to ``n`` unlabelled inputs,
    normalised to mean 1 over all entries."""
    if x is None or _len(x) == 0:
        raise ValueError("anchor kind 'ewc' needs unlabelled inputs (the Fisher uses no labels)")
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        sub = _take(x, torch.arange(min(n, _len(x))))
        dummy = torch.zeros(_len(sub), dtype=torch.long)
        f = _fisher(model, sub, dummy, transform, "true")
    finally:
        for k, p in model.named_parameters():
            p.requires_grad_(flags[k])
    mean = torch.cat([v.reshape(-1) for v in f.values()]).mean().clamp_min(1e-30)
    return {k: v / mean for k, v in f.items()}


# --- the entry point ---------------------------------------------------------------------------------


def finetune_small(model: nn.Module, strategy: StrategyConfig | str | Mapping[str, Any],
                   train: tuple[Inputs, Tensor], *, config: TrainConfig | Mapping[str, Any] | None = None,
                   unlabelled: Inputs | None = None, transform: Transform | None = None,
                   log: Callable[[str], None] | None = None) -> FitResult:
    """Fine-tune ``model`` (in place, on its device) with ``strategy`` on the labelled ``train = (x, y)``;
    choose the recipe and apply the guard as the module docstring describes. ``unlabelled`` inputs
    serve BN adaptation, pseudo-labels, entropy and the EWC Fisher. ``transform(x, train, generator)``
    turns stored inputs into model inputs (default: :func:`image_transform` with the recipe's
    augmentations for image tensors, identity otherwise). On return the model holds the fine-tuned
    weights, or the pretrained ones when the guard kept them."""
    t0 = time.perf_counter()
    strat = strategy if isinstance(strategy, StrategyConfig) else get_strategy(strategy)
    cfg = resolve_train(config, strat)
    say = log or (lambda s: None)
    device = _device(model)
    x, y = _to(train[0], device), train[1].to(device)
    if _len(x) != len(y):
        raise ValueError(f"train inputs ({_len(x)}) and labels ({len(y)}) differ in length")
    if unlabelled is not None:
        unlabelled = _to(unlabelled, device)
    if transform is None:
        transform = image_transform(cfg.augment) if isinstance(x, Tensor) and x.dim() == 4 else identity_transform
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    extras = _Extras()
    base_correct = count_correct(model, x, y, transform, cfg.eval_batch_size)
    n = len(y)

    def prep(xi: Inputs, yi: Tensor) -> TrainableReport:
        return _prepare(model, base_state, strat, cfg, xi, yi, transform, unlabelled, extras)

    def run(xi, yi, lr, epochs, evals, seed, patience=None):
        rep = prep(xi, yi)
        curves, best, rep = _train(model, rep, strat, cfg, lr, epochs, xi, yi, transform, unlabelled=unlabelled,
                                   extras=extras, evals=evals, seed=seed, patience=patience)
        return rep, curves, best

    def finish(rep, lr, epochs, chosen, scored, kept, msg, curves, selection) -> FitResult:
        if kept:
            model.load_state_dict(base_state)
            for p in model.parameters():
                p.requires_grad_(False)
        model.eval()
        say(msg)
        return FitResult(strat.name, lr, epochs, kept, msg, base_scored.get("correct", base_correct), chosen,
                         scored, rep, selection, curves, time.perf_counter() - t0, cfg.model_dump())

    base_scored: dict[str, int] = {}

    def guard_decision(chosen: int, base: int, scored: int, what: str) -> tuple[bool, str]:
        need = base + cfg.guard_margin * scored
        if not cfg.guard:
            return False, f"{strat.name}: {what} {chosen}/{scored} vs pretrained {base}/{scored} (guard off)"
        if chosen > need:
            return False, (f"{strat.name}: fine-tuned kept, {what} {chosen}/{scored} beats the pretrained "
                           f"model's {base}/{scored}")
        return True, (f"{strat.name}: guard kept the pretrained model: no fine-tuned recipe beat it on {what} "
                      f"({chosen}/{scored} vs {base}/{scored})")

    # label-free: nothing trains, the labelled examples are an untouched evaluation set
    if not strat.uses_labels:
        rep = prep(x, y)
        chosen = count_correct(model, x, y, transform, cfg.eval_batch_size)
        kept, msg = guard_decision(chosen, base_correct, n, "all labelled examples (label-free strategy)")
        return finish(rep, None, 0, chosen, n, kept, msg, {}, "label-free")

    if cfg.selection == "fixed":
        rep, _, _ = run(x, y, cfg.lr, cfg.epochs, (), cfg.seed)
        return finish(rep, cfg.lr, cfg.epochs, -1, 0, False, f"{strat.name}: fixed recipe lr={cfg.lr} "
                      f"epochs={cfg.epochs} (no guard)", {}, "fixed")

    if cfg.selection == "holdout":
        folds = stratified_folds(y, max(2, round(1 / cfg.holdout)), cfg.seed)
        val_idx = folds[0]
        tr_idx = torch.cat(folds[1:]).sort().values
        xv, yv = _take(x, val_idx), y[val_idx.to(device)]
        xt, yt = _take(x, tr_idx), y[tr_idx.to(device)]
        base_val = count_correct(model, xv, yv, transform, cfg.eval_batch_size)
        base_scored["correct"] = base_val
        best = None
        curves_out = {}
        for lr in cfg.grid():
            rep, curves, state = run(xt, yt, lr, cfg.epochs, [(xv, yv)], cfg.seed, cfg.patience or cfg.epochs + 1)
            curves_out[f"{lr:g}"] = curves[0]
            ep = max(range(len(curves[0])), key=lambda e: (curves[0][e], -e))
            if best is None or curves[0][ep] > best[0]:
                best = (curves[0][ep], lr, ep, state, rep)
        assert best is not None
        chosen, lr, ep, state, rep = best
        model.load_state_dict(state)
        kept, msg = guard_decision(chosen, base_val, len(yv), "the held-out validation part")
        return finish(rep, lr, ep, chosen, len(yv), kept, msg, curves_out, "holdout")

    # k-fold (or a fixed recipe with a k-fold guard)
    def kfold(lrs: Sequence[float], epochs: int, seed: int) -> dict[float, list[int]]:
        folds = stratified_folds(y, cfg.folds, seed)
        pooled = {lr: [0] * (epochs + 1) for lr in lrs}
        for f, held in enumerate(folds):
            rest = torch.cat([folds[j] for j in range(len(folds)) if j != f]).sort().values
            xt, yt = _take(x, rest), y[rest.to(device)]
            xv, yv = _take(x, held), y[held.to(device)]
            for lr in lrs:
                _, curves, _ = run(xt, yt, lr, epochs, [(xv, yv)], cfg.seed + 1000 * f)
                c = curves[0] + [curves[0][-1]] * (epochs + 1 - len(curves[0]))
                pooled[lr] = [a + b for a, b in zip(pooled[lr], c)]
            say(f"{strat.name}: fold {f + 1}/{len(folds)} done")
        return pooled

    if cfg.selection == "fixed_guarded":
        lr, ep = cfg.lr, cfg.epochs
        chosen = base_correct
        curves_out: dict[str, list[int]] = {}
        if cfg.guard:
            pooled = kfold([lr], ep, cfg.seed)
            curves_out = {f"{lr:g}": pooled[lr]}
            chosen = pooled[lr][ep]
        what = "pooled out-of-fold predictions of the fixed recipe"
    else:
        pooled = kfold(cfg.grid(), cfg.epochs, cfg.seed)
        curves_out = {f"{lr:g}": c for lr, c in pooled.items()}
        # best (lr, epoch); ties -> fewer epochs, then smaller lr (closer to the pretrained model)
        lr, ep = max(((lr, e) for lr in pooled for e in range(cfg.epochs + 1)),
                     key=lambda t: (pooled[t[0]][t[1]], -t[1], -t[0]))
        chosen = pooled[lr][ep]
        what = "pooled out-of-fold predictions"
        if cfg.guard and cfg.guard_resplit and ep > 0:
            again = kfold([lr], ep, cfg.seed + 7919)
            curves_out[f"resplit {lr:g}"] = again[lr]
            chosen = again[lr][ep]
            what = "pooled out-of-fold predictions on a fresh fold split"
    kept, msg = guard_decision(chosen, base_correct, n, what)
    if kept:
        rep = prep(x, y)
    else:
        rep, _, _ = run(x, y, lr, ep, (), cfg.seed)
    return finish(rep, lr, ep, chosen, n, kept, msg, curves_out, cfg.selection)
