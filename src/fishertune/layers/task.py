"""What an importance analysis needs to know about a model: :class:`LayerTask`.

Calibration data (``calib``: a re-iterable of batches) drives every analyser; evaluation data is only
seen by ``eval_metric``, which judges the compressed models. The two must not overlap (the built-in
tasks draw calibration from training data and evaluate on test data).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fishertune.fisher.estimators import default_batch
from fishertune.fisher.likelihoods import Likelihood, get_likelihood
from fishertune.layers.blocks import Block, find_blocks


@dataclass
class LayerTask:
    """A model with its blocks, calibration batches and metrics.

    - ``calib``: calibration batches; ``batch_to_inputs(batch) -> (inputs tuple, target)`` splits one
      (default: ``(x, y)`` pairs, as in :func:`fishertune.fisher.diagonal_fisher`);
    - ``likelihood``: the per-sample negative log-likelihood of the model output (a name, a
      :class:`~fishertune.fisher.Likelihood` or a ``log_prob(output, target)`` callable);
    - ``calib_metric(model) -> float`` (higher is better) on calibration data, used by the ablation
      analysers; default: minus the mean negative log-likelihood over ``calib``;
    - ``eval_metric(model) -> float`` (higher is better) on evaluation data, for measuring plans;
    - ``token_mask(batch) -> bool tensor`` (``B x T``) of real positions for hidden-state similarities
      (padding excluded); ``None`` = every position counts;
    - ``latency_inputs``: a tuple of model inputs timed by the latency measurement;
    - ``build``: a no-argument function returning a fresh dense model (reloading saved plans);
    - ``spec``: how the model was named (stored in plans).
    """

    model: nn.Module
    calib: Sequence[Any]
    likelihood: str | Likelihood | Callable = "categorical"
    batch_to_inputs: Callable[[Any], tuple[tuple, Tensor]] | None = None
    calib_metric: Callable[[nn.Module], float] | None = None
    eval_metric: Callable[[nn.Module], float] | None = None
    metric_name: str = "metric"
    token_mask: Callable[[Any], Tensor | None] | None = None
    latency_inputs: tuple | None = None
    build: Callable[[], nn.Module] | None = None
    spec: str = ""
    block_names: Sequence[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.calib) == 0:
            raise ValueError("the calibration data is empty")
        self.lik = get_likelihood(self.likelihood)
        self.blocks: list[Block] = find_blocks(self.model, self.block_names)

    def split(self, batch: Any) -> tuple[tuple, Tensor]:
        return (self.batch_to_inputs or default_batch)(batch)

    def mask(self, batch: Any) -> Tensor | None:
        return self.token_mask(batch) if self.token_mask is not None else None

    @torch.no_grad()
    def calibration_score(self, model: nn.Module | None = None) -> float:
        """``calib_metric(model)``, or minus the mean NLL over the calibration batches."""
        model = self.model if model is None else model
        if self.calib_metric is not None:
            return float(self.calib_metric(model))
        total, count = 0.0, 0
        was = model.training
        model.eval()
        try:
            for batch in self.calib:
                inputs, target = self.split(batch)
                losses, n = self.lik.nll(model(*inputs), target)
                total += float(losses.sum())
                count += int(n)
        finally:
            model.train(was)
        return -total / max(count, 1)
