"""``CDRConfig``: everything one cross-domain run needs, validated strictly (unknown keys are errors).

Top-level shortcuts ``domains=sport_cloth task=dual-user-intra protocol=original`` are accepted as
overrides and moved into ``data`` (see :func:`load_cdr_config`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from fishertune.config import (
    StrictModel,
    deep_merge,
    parse_overrides,
    read_yaml,
    validate,
)
from fishertune.tune import FisherTuneConfig

__all__ = [
    "SHORTCUTS",
    "CDRConfig",
    "CDRDataConfig",
    "CDREvalConfig",
    "CDRModelConfig",
    "CDRTrainConfig",
    "load_cdr_config",
]

SHORTCUTS = {"domains": "data", "task": "data", "protocol": "data"}


class CDRDataConfig(StrictModel):
    """Which scenario, and how it is evaluated."""

    task: Literal["dual-user-intra", "dual-user-inter"] = "dual-user-intra"
    domains: str = Field("sport_cloth", description="the pair folder name, e.g. sport_cloth")
    val_seed: int = Field(0, description="seed of the one-item-per-user validation hold-out (intra)")
    negative_seed: int = Field(0, description="seed of the test negatives (valid: +1, protocol original: +2)")
    n_negatives: int = Field(999, ge=1)
    protocol: Literal["sampled", "original"] = Field(
        "sampled", description="sampled: select on validation; original: select on test.txt with a second "
                               "negative draw, as UniCDR's code does (test-set selection, labelled)")
    holdout: bool = Field(True, description="dual-user-intra: hold one training item per user out for "
                          "validation; false: train on every training interaction for train.epochs epochs "
                          "and test the last (a refit with the epoch count a held-out run chose)")


class CDRModelConfig(StrictModel):
    """The UniCDR-style model (defaults: UniCDR's ``train_rec.py``)."""

    dim: int = Field(128, ge=1)
    aggregator: Literal["mean", "user_attention", "item_similarity"] = "mean"
    lambda_a: float = Field(0.5, ge=0, le=1, description="weight of the user-ID embedding in a representation")
    mask_rate: float = Field(0.1, ge=0, lt=1, description="interaction masking of training contexts")
    max_len: int = Field(10, ge=1, description="training context length per domain")
    eval_max_len: int = Field(50, ge=1, description="evaluation context length per domain")
    eval_shared_own: bool = Field(True, description="the shared context holds the target domain's items at "
                                                    "evaluation (UniCDR; training masks them out)")
    dropout: float = Field(0.3, ge=0, lt=1)
    n_train_negatives: int = Field(10, ge=1)
    rec_loss: Literal["bce", "softmax"] = Field(
        "bce", description="bce: UniCDR's binary cross-entropy on the positive and each negative; softmax: "
                           "cross-entropy of the positive among itself and its sampled negatives")
    item_bias: bool = Field(False, description="a learned per-item score offset (UniCDR has none)")
    init_std: float = Field(0.1, gt=0, description="std of the normal init of user and item embeddings "
                                                   "(UniCDR: torch's default, 1.0)")
    contrastive: Literal["bilinear", "infonce", "none"] = Field(
        "bilinear", description="bilinear: UniCDR's discriminator between specific and shared; infonce")
    contrastive_weight: float = Field(0.6, ge=0, le=1, description="loss = (1-w) rec + w contrastive "
                                                                     "(UniCDR's lambda_loss = 1 - w = 0.4)")
    temperature: float = Field(0.2, gt=0, description="InfoNCE temperature")


class CDRTrainConfig(StrictModel):
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(512, ge=1, description="per domain and step")
    lr: float = Field(1e-3, gt=0, description="Adam's rate; FisherTune's shared_lr / specific_lr default to it")
    weight_decay: float = Field(1e-5, ge=0, description="Adam's L2; the groups' weight decays default to it")
    grad_clip: float | None = Field(None, gt=0)
    patience: int | None = Field(8, ge=1, description="evaluations without improvement before stopping")
    eval_every: int = Field(1, ge=1)
    seed: int = 0
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    amp: bool = Field(False, description="bfloat16 autocast on CUDA (ignored on CPU)")
    checkpoint_every: int = Field(1, ge=0, description="epochs between checkpoints (0: only at the end)")
    fisher_batches: int = Field(4, ge=1, description="training batches per domain for FisherTune's Fisher")
    time_limit_s: float | None = Field(None, gt=0, description="wall-clock budget of the training loop: once "
                                       "an epoch ends past it, training stops and the best epoch so far is "
                                       "tested (the row says stop_reason: time_limit)")


class CDREvalConfig(StrictModel):
    full: bool = Field(True, description="also rank all items at test (HR/NDCG@10,20, MRR)")
    batch_size: int = Field(1024, ge=1)
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10])
    full_ks: list[int] = Field(default_factory=lambda: [10, 20])


class CDRConfig(StrictModel):
    name: str = "cdr"
    output_dir: str = "runs/cdr"
    data: CDRDataConfig = CDRDataConfig()
    model: CDRModelConfig = CDRModelConfig()
    train: CDRTrainConfig = CDRTrainConfig()
    eval: CDREvalConfig = CDREvalConfig()
    fishertune: FisherTuneConfig = Field(default_factory=lambda: FisherTuneConfig(use_fishertune=False))

    @model_validator(mode="before")
    @classmethod
    def _group_rates(cls, data: Any) -> Any:
        """No ``fishertune`` section: the baseline. A section (or preset) starts from FisherTune's
        defaults, except that the groups' learning rates and weight decays default to ``train.lr`` and
        ``train.weight_decay`` (baseline and FisherTune runs differ only where a preset says so) and the
        adaptive scheduler follows the validation NDCG@10 (mean over domains, higher is better)."""
        if not isinstance(data, dict):
            return data
        train = data.get("train") or {}
        train = train if isinstance(train, dict) else train.model_dump()
        lr = train.get("lr", CDRTrainConfig.model_fields["lr"].default)
        wd = train.get("weight_decay", CDRTrainConfig.model_fields["weight_decay"].default)
        ft = data.get("fishertune")
        ft = {"use_fishertune": False} if ft is None else (dict(ft) if isinstance(ft, dict) else ft)
        if isinstance(ft, dict):
            for g in ("shared", "specific"):
                ft.setdefault(f"{g}_lr", lr)
                ft.setdefault(f"{g}_weight_decay", wd)
            ft.setdefault("scheduler_metric", "valid_ndcg@10")  # what the trainer reports each evaluation
            ft.setdefault("scheduler_mode", "max")
        return {**data, "fishertune": ft}

    @model_validator(mode="after")
    def _refit(self) -> CDRConfig:
        """Without a hold-out nothing is validated: only the sampled protocol's intra task can refit, and
        the adaptive scheduler, which follows validation, cannot run."""
        if self.data.holdout:
            return self
        if self.data.task != "dual-user-intra" or self.data.protocol != "sampled":
            raise ValueError("data.holdout=false (refit on every training interaction) is for task "
                             "dual-user-intra with protocol sampled")
        ft = self.fishertune
        if ft.use_fishertune and ft.use_adaptive_scheduler:
            raise ValueError("data.holdout=false: the adaptive scheduler follows validation, which a refit "
                             "has none of; turn it off (fishertune.use_adaptive_scheduler=false)")
        return self


def _lift_shortcuts(data: dict) -> dict:
    data = dict(data)
    for key, section in SHORTCUTS.items():
        if key in data and not isinstance(data[key], dict):
            data = deep_merge(data, {section: {key: data.pop(key)}})
    return data


def load_cdr_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                    preset: dict | None = None) -> CDRConfig:
    """YAML (optional) + FisherTune preset overrides (``fishertune`` keys) + ``key=value`` overrides.

    A preset's keys go into ``fishertune`` (its ``train`` keys into ``train``); it turns FisherTune on
    unless it says ``use_fishertune: false`` (the ``baseline`` preset).
    ``domains=`` / ``task=`` / ``protocol=`` are shortcuts for ``data.<key>=``.
    """
    data: dict = {}
    if path is not None:
        data = _lift_shortcuts(read_yaml(path))
    if preset is not None:  # a preset other than baseline turns FisherTune on, whatever the YAML said
        preset = dict(preset)
        train = preset.pop("train", None) or {}
        preset.setdefault("use_fishertune", True)
        data = deep_merge(data, {"train": train, "fishertune": preset})
    data = deep_merge(data, _lift_shortcuts(parse_overrides(overrides)))
    return validate(CDRConfig, data, source=str(path) if path else "config")
