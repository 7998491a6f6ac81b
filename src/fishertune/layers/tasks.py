"""Built-in :class:`~fishertune.layers.task.LayerTask` adapters and the ``MODEL_SPEC`` resolver of the CLI.

| spec | model | calibration (never the evaluation data) | evaluation |
|---|---|---|---|
| ``resnet56``, ``resnet20`` | CIFAR ResNet (zoo, pretrained, strict load) | ``calib`` JPEG *training* images (``train5k``, seeded, class-balanced); calibration metric: minus the mean cross-entropy | top-1 accuracy on the JPEG test set (``eval_per_class`` images per class, default all 1,000) |
| ``minilm`` | all-MiniLM-L6-v2 as a sentence-pair cosine model (optional ``text`` extra) | ``calib`` STS-B *train* pairs (seeded), Gaussian likelihood of ``cos`` vs ``score / 5`` (the CosineSimilarityLoss); calibration metric: Spearman on those pairs | Spearman of cosine similarities on STS-B test |
| ``FILE.py:FUNC`` / ``package.module:FUNC`` | anything: ``FUNC(**options) -> LayerTask`` | | |

Options come as ``key=value`` strings (``--set calib=256``) and are passed to the adapter.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fishertune.layers.task import LayerTask


def _calib_batches(x: Tensor, y: Tensor, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    return [(x[s:s + batch_size], y[s:s + batch_size]) for s in range(0, len(x), batch_size)]


def resnet_task(depth: int = 56, calib: int = 500, calib_batch: int = 100, seed: int = 0,
                eval_per_class: int | None = None, latency_batch: int = 32, device: str = "cpu") -> LayerTask:
    """CIFAR ResNet on JPEG CIFAR-10: calibration on ``calib`` training images, accuracy on test
    (model, calibration and evaluation on ``device``; latency inputs stay on the CPU)."""
    from fishertune.zoo import CifarResNet, draw_per_class, load_cifar_jpeg, load_cifar_resnet, normalize

    calib, calib_batch = int(calib), int(calib_batch)
    if calib < 10 or calib % 10:
        raise ValueError(f"calib must be a positive multiple of 10 (class-balanced), got {calib}")
    dev = torch.device(device)
    model = load_cifar_resnet(int(depth)).to(dev)
    tx, ty = load_cifar_jpeg("train5k")
    idx = draw_per_class(ty, k=calib // 10, seed=int(seed))
    cx, cy = normalize(tx[idx]).to(dev), ty[idx].to(dev)
    ex, ey = load_cifar_jpeg("test", first_per_class=None if eval_per_class is None else int(eval_per_class))

    @torch.no_grad()
    def eval_metric(m: nn.Module, batch_size: int = 500) -> float:
        m.eval()
        correct = 0
        for s in range(0, len(ex), batch_size):
            logits = m(normalize(ex[s:s + batch_size]).to(dev))
            correct += int((logits.argmax(1).cpu() == ey[s:s + batch_size]).sum())
        return correct / len(ex)

    return LayerTask(model, _calib_batches(cx, cy, calib_batch), likelihood="categorical",
                     eval_metric=eval_metric, metric_name="accuracy",
                     latency_inputs=(normalize(ex[:int(latency_batch)]),), build=lambda: CifarResNet(int(depth)),
                     spec=f"resnet{depth}",
                     info={"calib": f"{calib} JPEG train5k images (seed {seed})",
                           "eval": f"JPEG test, {len(ey)} images", "latency": f"batch of {latency_batch} images"})


class PairCosine(nn.Module):
    """A sentence encoder as an STS model: ``forward(ids1, mask1, ids2, mask2) -> cos`` (B,)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def blocks(self) -> list[tuple[str, nn.Module]]:
        return [(f"encoder.{n}", m) for n, m in self.encoder.blocks()]

    def forward(self, ids1: Tensor, mask1: Tensor, ids2: Tensor, mask2: Tensor) -> Tensor:
        a = self.encoder(ids1, mask1)
        b = self.encoder(ids2, mask2)
        return (a * b).sum(-1)


def minilm_task(calib: int = 512, calib_batch: int = 32, seed: int = 0, eval_split: str = "test",
                calib_metric: str = "spearman", latency_batch: int = 32, path: str | None = None,
                device: str = "cpu") -> LayerTask:
    """all-MiniLM-L6-v2 on STS-B: calibration on ``calib`` training pairs, Spearman on ``eval_split``
    (model and calibration on ``device``; latency inputs stay on the CPU)."""
    from fishertune.fisher.likelihoods import Gaussian
    from fishertune.zoo.minilm import load_minilm
    from fishertune.zoo.text import load_stsb, spearman, stsb_spearman

    if eval_split == "train":
        raise ValueError("eval_split must not be the calibration split (train)")
    if calib_metric not in ("spearman", "loss"):
        raise ValueError(f"calib_metric must be 'spearman' or 'loss', got {calib_metric!r}")
    dev = torch.device(device)
    encoder = load_minilm(path, device=dev)
    model = PairCosine(encoder).eval()
    train = load_stsb("train")
    rng = np.random.default_rng(int(seed))
    sub = train.subset(np.sort(rng.choice(len(train), size=min(int(calib), len(train)), replace=False)))
    batches = []
    for s in range(0, len(sub), int(calib_batch)):
        ids1, m1 = encoder.tokenize(sub.sentence1[s:s + int(calib_batch)])
        ids2, m2 = encoder.tokenize(sub.sentence2[s:s + int(calib_batch)])
        y = torch.as_tensor(sub.scores[s:s + int(calib_batch)] / 5.0, dtype=torch.float32)
        batches.append((tuple(t.to(dev) for t in (ids1, m1, ids2, m2)), y.to(dev)))
    evaluation = load_stsb(eval_split)

    @torch.no_grad()
    def calib_spearman(m: nn.Module) -> float:
        cos = torch.cat([m(*b[0]).float().cpu() for b in batches])
        return spearman(cos.numpy(), sub.scores)

    def eval_metric(m: nn.Module) -> float:
        return stsb_spearman(m.encoder.encode, evaluation)

    lat = evaluation.subset(np.arange(min(int(latency_batch), len(evaluation))))
    lat_inputs = (*encoder.tokenize(lat.sentence1), *encoder.tokenize(lat.sentence2))
    return LayerTask(model, batches, likelihood=Gaussian(), calib_metric=calib_spearman if calib_metric == "spearman"
                     else None, eval_metric=eval_metric, metric_name="spearman",
                     token_mask=lambda batch: [batch[0][1], batch[0][3]], latency_inputs=lat_inputs,
                     build=lambda: PairCosine(load_minilm(path)), spec="minilm",
                     info={"calib": f"{len(sub)} STS-B train pairs (seed {seed})",
                           "eval": f"STS-B {eval_split}, {len(evaluation)} pairs",
                           "latency": f"batch of {len(lat)} sentence pairs"})


BUILTIN: dict[str, Callable[..., LayerTask]] = {
    "resnet56": lambda **o: resnet_task(56, **o),
    "resnet20": lambda **o: resnet_task(20, **o),
    "minilm": minilm_task,
}


def _parse_value(v: str) -> Any:
    import yaml

    return yaml.safe_load(v) if v != "" else ""


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """``["calib=256", "seed=1"] -> {"calib": 256, "seed": 1}`` (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"option {item!r} must look like key=value")
        out[key.strip()] = _parse_value(value)
    return out


def resolve_factory(spec: str) -> Callable[..., LayerTask]:
    """The adapter a ``MODEL_SPEC`` names (see the module docstring)."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" not in spec:
        raise ValueError(f"unknown model {spec!r}: use one of {sorted(BUILTIN)}, FILE.py:FUNCTION or "
                         "package.module:FUNCTION")
    target, _, func = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (from model spec {spec!r})")
        name = f"_fishertune_task_{path.stem}"
        mod_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    fn = getattr(module, func, None)
    if not callable(fn):
        raise ValueError(f"{target} has no function {func!r}")
    return fn


def build_task(spec: str, options: dict[str, Any] | None = None) -> LayerTask:
    """Build the task for ``spec`` with adapter options; unknown options are reported by name."""
    fn = resolve_factory(spec)
    try:
        task = fn(**(options or {}))
    except TypeError as err:
        if "unexpected keyword" in str(err):
            raise ValueError(f"{spec}: {err}") from err
        raise
    if not isinstance(task, LayerTask):
        raise ValueError(f"{spec} returned {type(task).__name__}, not a LayerTask")
    task.spec = task.spec or spec
    return task
