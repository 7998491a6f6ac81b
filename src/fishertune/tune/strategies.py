"""Named, serialisable fine-tuning strategies: which parameters train, at which learning rate, and
what else happens to the model (BatchNorm-statistics adaptation, a Fisher mask, an anchor to the
pretrained weights, pseudo-labels or entropy on unlabelled target data).

A strategy is a :class:`StrategyConfig` (strict: an unknown key is an error naming it). Its ``rules``
start from an all-frozen model and switch parameters on (or off) in order; each rule selects modules by
name pattern or role (``stem``, ``head``, ``layer1..3``, ``stage1..3``, ``encoder.*``, ``re:<regex>``),
by module type (``norm``, ``batchnorm``, ``layernorm``, ``linear``, ``conv``, ``embedding`` or a class
name) and by parameter kind (``weight`` / ``bias`` / ``all``). :func:`apply` sets ``requires_grad``
and returns a :class:`TrainableReport` (count, share, per module, per role, lr scales, masks).

Presets (:data:`PRESETS`, :func:`get_strategy`): ``head_only``, ``decoder_head``, ``full_low_lr``,
``bitfit``, ``norm_only``, ``bn_adapt``, ``fish_mask``, ``layerwise_lr_decay``, ``l2sp``, ``ewc``,
``tent``, ``self_train`` and combinations (``bn_adapt_head``, ``self_train_ewc``, ...), and ``fishertune``
(the progressive :class:`~fishertune.tune.fishertune.FisherTuner` choosing, epoch by epoch, which
entries of the ``rules``' parameters train; its ``fishertune:`` mapping holds ``FisherTuneConfig`` keys).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from fishertune.config import ConfigError, StrictModel, deep_merge, validate
from fishertune.tune.fishertune import FisherTuneConfig

# --- configs -----------------------------------------------------------------------------------------


class Rule(StrictModel):
    """Select parameters and set them trainable (or frozen) with an lr scale.

    ``select``: module patterns or roles (empty = the whole model); ``exclude``: patterns removed from
    the selection; ``types``: module types owning the parameter (empty = any); ``params``: which
    parameters of those modules.
    """

    select: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    types: list[str] = Field(default_factory=list)
    params: Literal["all", "weight", "bias"] = "all"
    trainable: bool = True
    lr_scale: float = Field(1.0, gt=0)


class BNAdaptConfig(StrictModel):
    """Re-estimate BatchNorm running statistics on target images (no labels) and mix them with the
    source statistics: ``stat = (1 - alpha) * source + alpha * target`` (alpha = 1: plain
    re-estimation; Schneider et al. 2020 write alpha = n / (n + N))."""

    alpha: float = Field(0.2, ge=0, le=1)
    source: Literal["unlabelled", "labelled"] = "unlabelled"
    max_images: int | None = Field(None, ge=1)
    batch_size: int = Field(256, ge=1)


class FishMaskConfig(StrictModel):
    """Keep the top ``keep`` share (0-1) of the candidate parameters' entries by diagonal empirical
    Fisher on the labelled training images (Sung et al. 2021, FISH mask), fixed during training.
    Parameters matching ``always`` (default: the head) stay fully trainable."""

    keep: float = Field(0.005, gt=0, le=1)
    always: list[str] = Field(default_factory=lambda: ["head"])
    kind: Literal["empirical", "true", "exact"] = "empirical"


class AnchorConfig(StrictModel):
    """Pull trainable parameters towards the pretrained ones: ``strength/2 * sum w (theta - theta0)^2``
    with ``w = 1`` (``l2sp``, Li et al. 2018) or the diagonal Fisher of the pretrained model on the
    target inputs, normalised to mean 1 (``ewc``: labels sampled from the model, no labels needed)."""

    kind: Literal["l2sp", "ewc"] = "l2sp"
    strength: float = Field(0.01, ge=0)
    fisher_images: int = Field(1000, ge=1)


class PseudoLabelConfig(StrictModel):
    """Self-training on unlabelled target images: the teacher (the starting model, frozen; its
    predictions averaged over a horizontal flip when ``tta``) labels each image once; the student
    learns those with probability >= ``threshold`` under the training augmentation, weighted by
    ``weight`` against the labelled loss."""

    threshold: float = Field(0.9, ge=0, le=1)
    weight: float = Field(1.0, ge=0)
    batch_size: int = Field(128, ge=1)
    soft: bool = False
    tta: bool = True


class EntropyConfig(StrictModel):
    """TENT-style entropy minimisation of predictions on unlabelled target images (Wang et al. 2021)."""

    weight: float = Field(1.0, ge=0)
    batch_size: int = Field(128, ge=1)


class StrategyConfig(StrictModel):
    """One named fine-tuning strategy (see the module docstring). ``train`` holds overrides of the
    training recipe (:class:`fishertune.tune.smalldata.TrainConfig` keys, checked when training)."""

    name: str = "custom"
    description: str = ""
    rules: list[Rule] = Field(default_factory=list)
    layer_decay: float | None = Field(None, gt=0, le=1)
    bn_adapt: BNAdaptConfig | None = None
    fish_mask: FishMaskConfig | None = None
    anchor: AnchorConfig | None = None
    pseudo_label: PseudoLabelConfig | None = None
    entropy: EntropyConfig | None = None
    fishertune: dict[str, Any] | None = None
    train: dict[str, Any] = Field(default_factory=dict)

    @field_validator("fishertune")
    @classmethod
    def _fishertune_keys(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            fishertune_config(v)
        return v

    @model_validator(mode="after")
    def _check(self) -> StrategyConfig:
        if self.fish_mask is not None and not self.rules:
            raise ValueError("fish_mask needs rules naming the candidate parameters (e.g. select: [])")
        if self.fishertune is not None and not self.rules:
            raise ValueError("fishertune needs rules naming the candidate parameters (e.g. select: [])")
        if self.fishertune is not None and self.fish_mask is not None:
            raise ValueError("fishertune and fish_mask both choose which entries train; use one of them")
        return self

    @property
    def uses_labels(self) -> bool:
        """Whether any parameter is trained (with the labelled loss)."""
        return bool(self.rules) or self.fishertune is not None

    @property
    def uses_unlabelled(self) -> bool:
        return ((self.bn_adapt is not None and self.bn_adapt.source == "unlabelled")
                or self.pseudo_label is not None or self.entropy is not None
                or (self.anchor is not None and self.anchor.kind == "ewc"))


# --- presets -----------------------------------------------------------------------------------------

_ALL: dict[str, Any] = {"select": []}
_HEAD: dict[str, Any] = {"select": ["head"]}
_NORM: dict[str, Any] = {"types": ["norm"]}

PRESETS: dict[str, dict[str, Any]] = {
    "head_only": {"description": "train the task head only", "rules": [_HEAD],
                  "train": {"lr_grid": [0.003, 0.01, 0.03]}},
    "decoder_head": {"description": "freeze the encoder; train the last stage / layer (decoder) and head",
                     "rules": [{"select": ["decoder", "head"]}], "train": {"lr_grid": [0.001, 0.003, 0.01]}},
    "full_low_lr": {"description": "everything at a small learning rate", "rules": [_ALL],
                    "train": {"lr_grid": [0.0001, 0.0003, 0.001]}},
    "bitfit": {"description": "biases (and the head)", "rules": [{"params": "bias"}, _HEAD],
               "train": {"lr_grid": [0.001, 0.003, 0.01]}},
    "norm_only": {"description": "normalisation layers' affine parameters (and the head)",
                  "rules": [_NORM, _HEAD], "train": {"lr_grid": [0.001, 0.003, 0.01]}},
    "bn_adapt": {"description": "BatchNorm statistics mixed with target statistics; no labels, no training",
                 "bn_adapt": {"alpha": 0.2}},
    "bn_adapt_head": {"description": "bn_adapt, then the head", "bn_adapt": {"alpha": 0.2}, "rules": [_HEAD],
                      "train": {"lr_grid": [0.003, 0.01, 0.03]}},
    "fish_mask": {"description": "top 0.5 % of entries by Fisher (and the head)", "rules": [_ALL],
                  "fish_mask": {"keep": 0.005}, "train": {"lr_grid": [0.001, 0.003, 0.01]}},
    "layerwise_lr_decay": {"description": "everything, lr decayed by 0.8 per block from the head down",
                           "rules": [_ALL], "layer_decay": 0.8, "train": {"lr_grid": [0.0003, 0.001, 0.003]}},
    "l2sp": {"description": "everything, anchored to the pretrained weights (L2-SP)", "rules": [_ALL],
             "anchor": {"kind": "l2sp", "strength": 0.01}, "train": {"lr_grid": [0.0003, 0.001, 0.003]}},
    "ewc": {"description": "everything, anchored by the pretrained model's Fisher on target images (EWC)",
            "rules": [_ALL], "anchor": {"kind": "ewc", "strength": 1.0}, "train": {"lr_grid": [0.0003, 0.001, 0.003]}},
    "tent": {"description": "normalisation affine parameters by entropy on unlabelled images + labelled loss",
             "rules": [_NORM], "entropy": {"weight": 1.0}, "train": {"lr_grid": [0.0003, 0.001, 0.003]}},
    "self_train": {"description": "everything, on the labelled images plus confident pseudo-labels of the "
                                  "unlabelled images (frozen teacher = the pretrained model, flip-averaged); "
                                  "recipe fixed in advance, k-fold only for the guard",
                   "rules": [_ALL], "pseudo_label": {"threshold": 0.9, "weight": 1.0, "batch_size": 64},
                   "train": {"lr": 0.001, "selection": "fixed_guarded", "epochs": 5, "steps_per_epoch": 20}},
    "self_train_ewc": {"description": "self_train anchored by EWC", "rules": [_ALL],
                       "pseudo_label": {"threshold": 0.9, "weight": 1.0, "batch_size": 64},
                       "anchor": {"kind": "ewc", "strength": 1.0},
                       "train": {"lr": 0.001, "selection": "fixed_guarded", "epochs": 5, "steps_per_epoch": 20}},
}
"""Named strategies (``train`` entries are recipe overrides; ``lr_grid`` is what k-fold chooses from)."""

FISHERTUNE_PRESET: dict[str, Any] = {
    "description": "progressive Fisher-guided fine-tuning (FisherTuner): head-only warm-up, then the entries "
                   "with the highest Fisher on the labelled fold train, delta_max -> delta_min (shared = body, "
                   "specific = head)",
    "rules": [_ALL], "fishertune": {"fishertune_warmup": 2},
    "train": {"lr_grid": [0.0003, 0.001, 0.003]}}
"""The ``fishertune`` strategy, by name like a preset (kept out of :data:`PRESETS`, the classic strategies)."""


# FisherTuneConfig keys that finetune_small sets itself: the recipe's lr (lr_grid x the rules' lr_scale),
# weight decay and optimizer apply to every trained parameter, as for the other strategies
_FT_RECIPE_KEYS = {"shared_lr": "train.lr / train.lr_grid (and a rule's lr_scale)",
                   "specific_lr": "train.lr / train.lr_grid (and a rule's lr_scale, e.g. on the head)",
                   "shared_weight_decay": "train.weight_decay", "specific_weight_decay": "train.weight_decay"}


def fishertune_config(mapping: Mapping[str, Any]) -> FisherTuneConfig:
    """The :class:`FisherTuneConfig` of a small-data strategy's ``fishertune:`` mapping (strict: an
    unknown key or a bad value is a :class:`ConfigError` naming it). Keys the small-data recipe owns
    (the groups' lr and weight decay), the recommender's perturbations and an adaptive scheduler on a
    metric the loop does not produce are refused with what to use instead."""
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"fishertune: expected a mapping of FisherTuneConfig keys, got {type(mapping).__name__}")
    owned = [k for k in mapping if k in _FT_RECIPE_KEYS]
    if owned:
        raise ConfigError("fishertune: " + "; ".join(f"{k!r} is set by the small-data recipe: use {_FT_RECIPE_KEYS[k]}"
                                                     for k in owned))
    cfg = validate(FisherTuneConfig, dict(mapping), source="fishertune (FisherTuneConfig keys, docs/tune.md)")
    if cfg.perturbation_type in ("edge_dropout", "popularity"):
        raise ConfigError(f"fishertune: perturbation_type={cfg.perturbation_type!r} is a recommender perturbation; "
                          "for a classifier use none, noise (input noise, or noise on perturbation_modules), "
                          "feature_shift or combined")
    if cfg.use_adaptive_scheduler and cfg.scheduler_metric != "train_loss":
        raise ConfigError(f"fishertune: the adaptive scheduler in finetune_small sees only 'train_loss' (mean "
                          f"training loss of the epoch), not {cfg.scheduler_metric!r}: set scheduler_metric: train_loss")
    return cfg


def get_strategy(name: str | Mapping[str, Any] | StrategyConfig,
                 overrides: Mapping[str, Any] | None = None) -> StrategyConfig:
    """A preset by name (``"fishertune"`` when :mod:`fishertune.tune` provides it), a mapping (which
    may name a preset in ``base``), or a config; ``overrides`` are merged on top."""
    if isinstance(name, StrategyConfig):
        data = name.model_dump()
    elif isinstance(name, str):
        data = dict(_preset(name), name=name)
    else:
        data = dict(name)
        base = data.pop("base", None)
        if base is not None:
            data = deep_merge(dict(_preset(base), name=data.get("name", base)), data)
    if overrides:
        data = deep_merge(data, dict(overrides))
    return validate(StrategyConfig, data, source=f"strategy {data.get('name', '?')}")


def _preset(name: str) -> dict[str, Any]:
    if name in PRESETS:
        return PRESETS[name]
    if name == "fishertune":
        return FISHERTUNE_PRESET
    raise ConfigError(f"unknown strategy {name!r}; choose from {sorted([*PRESETS, 'fishertune'])} "
                      "or give a mapping with rules")


# --- module roles and patterns -----------------------------------------------------------------------

_RANGE = re.compile(r"^(?P<stem>[A-Za-z_][\w.]*?)(?P<a>\d+)\.\.(?P<b>\d+)$")

TYPE_ALIASES: dict[str, tuple[type, ...]] = {
    "batchnorm": (nn.modules.batchnorm._BatchNorm,),
    "layernorm": (nn.LayerNorm,),
    "groupnorm": (nn.GroupNorm,),
    "norm": (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
             *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())),
    "linear": (nn.Linear,),
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "embedding": (nn.Embedding,),
}


def model_roles(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Role -> module names for freeze rules.

    CIFAR ResNets: :data:`fishertune.zoo.cifar_resnet.GROUPS` (``stem``, ``layer1..3``, ``head``) plus
    ``stage1..3`` (= ``layer1..3``) and ``decoder`` (the last stage). A model may define its own
    ``ROLES``/``GROUPS`` mapping. Otherwise: ``head`` is a top-level ``head``/``classifier``/``fc``/
    ``linear`` module, or the last ``nn.Linear``; a transformer's ``encoder.layer`` list gives
    ``layer0..`` and ``decoder`` (its last layer); ``encoder`` is the module named ``encoder``.
    """
    from fishertune.zoo.cifar_resnet import GROUPS, STAGES, CifarResNet

    names = [n for n, _ in model.named_modules() if n]
    if isinstance(model, CifarResNet):
        roles = {k: tuple(v) for k, v in GROUPS.items()}
        for i, s in enumerate(STAGES, start=1):
            roles[f"stage{i}"] = (s,)
        roles["decoder"] = (STAGES[-1],)
        return roles
    own = getattr(model, "ROLES", None) or getattr(model, "GROUPS", None)
    if isinstance(own, Mapping):
        return {k: tuple(v) if not isinstance(v, str) else (v,) for k, v in own.items()}
    roles: dict[str, tuple[str, ...]] = {}
    tops = {n for n in names if "." not in n}
    head = next((h for h in ("head", "classifier", "fc", "linear") if h in tops), None)
    if head is None:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    if head is not None:
        roles["head"] = (head,)
    modules = dict(model.named_modules())
    lists = [n for n, m in modules.items() if n.endswith("encoder.layer") and isinstance(m, nn.ModuleList)]
    if lists:
        layer_list = lists[0]
        n_layers = len(modules[layer_list])
        for i in range(n_layers):
            roles[f"layer{i}"] = (f"{layer_list}.{i}",)
        roles["decoder"] = (f"{layer_list}.{n_layers - 1}",)
        roles["encoder"] = (layer_list.rsplit(".", 1)[0],)
        prefix = layer_list[: -len("encoder.layer")]
        if f"{prefix}embeddings" in modules:
            roles["embeddings"] = (f"{prefix}embeddings",)
            roles["stem"] = (f"{prefix}embeddings",)
    return roles


def expand_pattern(pattern: str) -> list[str]:
    """``layer1..3`` -> ``[layer1, layer2, layer3]``; anything else unchanged."""
    m = _RANGE.match(pattern)
    if not m:
        return [pattern]
    a, b = int(m["a"]), int(m["b"])
    if b < a:
        raise ConfigError(f"pattern {pattern!r}: empty range {a}..{b}")
    return [f"{m['stem']}{i}" for i in range(a, b + 1)]


def match_modules(model: nn.Module, patterns: list[str], roles: Mapping[str, tuple[str, ...]] | None = None
                  ) -> set[str]:
    """Names of the modules a list of patterns selects (descendants not included).

    A pattern is a role (see :func:`model_roles`), ``name1..3`` (a range), ``re:<regex>`` (searched in
    the dotted name), a glob (``encoder.*``; also matched after any dot, so ``encoder.*`` finds
    ``0.auto_model.encoder.layer.3``), or an exact module name (also as a dotted suffix). A pattern
    that selects nothing is an error naming it and the roles.
    """
    roles = model_roles(model) if roles is None else roles
    names = [n for n, _ in model.named_modules()]
    out: set[str] = set()
    for raw in patterns:
        for pat in expand_pattern(raw):
            hit: set[str] = set()
            if pat in ("*", "all"):
                hit = {""}
            elif pat in roles:
                hit = set(roles[pat])
            elif pat.startswith("re:"):
                rx = re.compile(pat[3:])
                hit = {n for n in names if n and rx.search(n)}
            elif any(c in pat for c in "*?["):
                hit = {n for n in names if n and (fnmatch.fnmatchcase(n, pat) or fnmatch.fnmatchcase(n, "*." + pat))}
            else:
                hit = {n for n in names if n and (n == pat or n.endswith("." + pat))}
            if not hit:
                raise ConfigError(f"pattern {raw!r} selects no module; roles: {sorted(roles)}; "
                                  f"modules e.g. {[n for n in names if n][:8]}")
            out |= hit
    return out


def _under(name: str, prefixes: set[str]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def _owner_types(model: nn.Module) -> dict[str, nn.Module]:
    """Parameter name -> the module that directly owns it."""
    owners = {}
    for mname, m in model.named_modules():
        for pname, _ in m.named_parameters(recurse=False):
            owners[f"{mname}.{pname}" if mname else pname] = m
    return owners


def _type_match(module: nn.Module, types: list[str]) -> bool:
    if not types:
        return True
    for t in types:
        key = t.lower()
        if key in TYPE_ALIASES:
            if isinstance(module, TYPE_ALIASES[key]):
                return True
        elif any(c.__name__ == t for c in type(module).__mro__):
            return True
    return False


def _check_types(types: list[str]) -> None:
    for t in types:
        if t.lower() not in TYPE_ALIASES and not t[:1].isupper():
            raise ConfigError(f"unknown module type {t!r}; use {sorted(TYPE_ALIASES)} or a class name")


def select_rule(model: nn.Module, rule: Rule, roles: Mapping[str, tuple[str, ...]] | None = None) -> list[str]:
    """Parameter names a rule selects, in ``named_parameters`` order."""
    _check_types(rule.types)
    roles = model_roles(model) if roles is None else roles
    sel = match_modules(model, rule.select, roles) if rule.select else {""}
    exc = match_modules(model, rule.exclude, roles) if rule.exclude else set()
    owners = _owner_types(model)
    out = []
    for name, _ in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if not _under(name, sel):
            continue
        if exc and _under(name, exc):
            continue
        if not _type_match(owners[name], rule.types):
            continue
        if rule.params == "bias" and leaf != "bias":
            continue
        if rule.params == "weight" and leaf == "bias":
            continue
        out.append(name)
    return out


def depth_units(model: nn.Module) -> list[str]:
    """Ordered depth units (input to output) for layer-wise lr decay: stem, residual blocks / transformer
    layers, head; other models: top-level children in registration order."""
    from fishertune.zoo.cifar_resnet import CifarResNet

    if isinstance(model, CifarResNet):
        return ["conv1", "bn1", *[n for n, _ in model.blocks()], "linear"]
    roles = model_roles(model)
    layers = sorted((k for k in roles if re.fullmatch(r"layer\d+", k)), key=lambda k: int(k[5:]))
    if layers:
        units = [roles[k][0] for k in layers]
        if "embeddings" in roles:
            units = [roles["embeddings"][0], *units]
        if "head" in roles:
            units.append(roles["head"][0])
        return units
    return [n for n, _ in model.named_children()]


# --- apply -------------------------------------------------------------------------------------------


@dataclass
class TrainableReport:
    """What a strategy trains. ``per_module``: owning module -> (trainable, total) entries;
    ``per_role``: role -> (trainable, total); ``lr_scale``: trainable parameter -> lr multiplier;
    ``masks``: element masks (True = trainable) for parameters trained only in part."""

    strategy: str
    total: int
    trainable: int
    per_module: dict[str, tuple[int, int]]
    per_role: dict[str, tuple[int, int]]
    lr_scale: dict[str, float]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    buffers_changed: list[str] = field(default_factory=list)

    @property
    def share(self) -> float:
        return self.trainable / max(self.total, 1)

    @property
    def params(self) -> list[str]:
        return list(self.lr_scale)

    def summary(self) -> str:
        return (f"{self.strategy}: {self.trainable:,} of {self.total:,} parameters trainable "
                f"({100 * self.share:.3f} %)")

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "total": self.total, "trainable": self.trainable, "share": self.share,
                "per_module": {k: list(v) for k, v in self.per_module.items()},
                "per_role": {k: list(v) for k, v in self.per_role.items()},
                "lr_scale": dict(self.lr_scale), "masked": sorted(self.masks),
                "buffers_changed": list(self.buffers_changed)}


def apply(model: nn.Module, strategy: StrategyConfig | str, *,
          fisher: Mapping[str, torch.Tensor] | None = None) -> TrainableReport:
    """Set ``requires_grad`` on ``model``'s parameters according to ``strategy`` and report.

    ``fisher`` (parameter -> diagonal Fisher, e.g. from :func:`fishertune.fisher.diagonal_fisher`) is
    needed by ``fish_mask``: the top ``keep`` share of the candidate entries becomes the mask.
    """
    cfg = get_strategy(strategy) if isinstance(strategy, str) else strategy
    roles = model_roles(model)
    named = dict(model.named_parameters())
    train: dict[str, float] = {}
    for rule in cfg.rules:
        for name in select_rule(model, rule, roles):
            if rule.trainable:
                train[name] = rule.lr_scale
            else:
                train.pop(name, None)
    if cfg.layer_decay is not None and train:
        units = depth_units(model)
        depth = len(units) - 1
        for name in train:
            idx = max((i for i, u in enumerate(units) if name == u or name.startswith(u + ".")), default=depth)
            train[name] *= cfg.layer_decay ** (depth - idx)
    masks: dict[str, torch.Tensor] = {}
    if cfg.fish_mask is not None:
        if fisher is None:
            raise ValueError(f"strategy {cfg.name!r} (fish_mask) needs fisher=: the diagonal Fisher of the "
                             "candidate parameters on the labelled training data")
        always = set()
        if cfg.fish_mask.always:
            always = set(select_rule(model, Rule(select=cfg.fish_mask.always), roles))
        masks = fish_masks({n: fisher[n] for n in train if n not in always}, cfg.fish_mask.keep, named)
        for n in list(train):
            if n in masks and not bool(masks[n].any()):
                del train[n]
                del masks[n]
            elif n in masks and bool(masks[n].all()):
                del masks[n]
    for name, p in named.items():
        p.requires_grad_(name in train)
    buffers = ([n for n, _ in model.named_buffers() if n.rsplit(".", 1)[-1] in
                ("running_mean", "running_var", "num_batches_tracked")] if cfg.bn_adapt is not None else [])
    return _report(cfg.name, model, roles, train, masks, buffers)


def _report(strategy: str, model: nn.Module, roles: Mapping[str, tuple[str, ...]], train: dict[str, float],
            masks: dict[str, torch.Tensor], buffers: list[str]) -> TrainableReport:
    """Counts per owning module and role of the ``train`` parameters (``masks``: those trained in part)."""
    named = dict(model.named_parameters())
    owners: dict[str, list[int]] = {}
    for name, p in named.items():
        mod = name.rsplit(".", 1)[0] if "." in name else ""
        count = int(masks[name].sum()) if name in masks else (p.numel() if name in train else 0)
        rec = owners.setdefault(mod, [0, 0])
        rec[0] += count
        rec[1] += p.numel()
    per_role: dict[str, tuple[int, int]] = {}
    for role, mods in roles.items():
        t = tot = 0
        for mod, (a, b) in owners.items():
            if _under(mod, set(mods)):
                t, tot = t + a, tot + b
        per_role[role] = (t, tot)
    total = sum(p.numel() for p in named.values())
    trainable = sum(a for a, _ in owners.values())
    return TrainableReport(strategy, total, trainable, {k: (a, b) for k, (a, b) in owners.items()}, per_role,
                           train, masks, buffers)


def narrow_report(model: nn.Module, report: TrainableReport, selected: Mapping[str, torch.Tensor]) -> TrainableReport:
    """``report`` restricted to the entries that ``selected`` marks (True = trained at some point, e.g. the
    union of FisherTune's masks over the epochs): parameters never selected leave ``lr_scale`` (they are
    not saved in full by a delta), those selected in part get a mask; counts are recomputed. Parameters
    not named in ``selected`` keep their status."""
    unknown = sorted(set(selected) - set(report.lr_scale))
    if unknown:
        raise ValueError(f"narrow_report: {unknown[:8]} are not trainable in the report of {report.strategy!r}")
    train, masks = {}, dict(report.masks)
    for name, scale in report.lr_scale.items():
        m = selected.get(name)
        if m is None:
            train[name] = scale
            continue
        m = m.bool()
        if name in masks:
            m = m & masks[name].to(m.device)
        masks.pop(name, None)
        if not bool(m.any()):
            continue
        train[name] = scale
        if not bool(m.all()):
            masks[name] = m
    return _report(report.strategy, model, model_roles(model), train, masks, list(report.buffers_changed))


def fish_masks(fisher: Mapping[str, torch.Tensor], keep: float,
               params: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Boolean masks keeping the globally largest ``keep`` share of the entries of ``fisher`` (ties at
    the threshold broken by order, so exactly ``round(keep * N)`` entries are kept, at least one)."""
    if not fisher:
        raise ValueError("fish_mask: no candidate parameter")
    for n, f in fisher.items():
        if params is not None and tuple(f.shape) != tuple(params[n].shape):
            raise ValueError(f"fish_mask: Fisher of {n} has shape {tuple(f.shape)}, parameter {tuple(params[n].shape)}")
    flat = torch.cat([f.detach().reshape(-1).float().cpu() for f in fisher.values()])
    k = max(1, round(keep * flat.numel()))
    top = torch.topk(flat, k).indices
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[top] = True
    out, start = {}, 0
    for n, f in fisher.items():
        out[n] = chosen[start:start + f.numel()].view(f.shape).to(f.device)
        start += f.numel()
    return out
