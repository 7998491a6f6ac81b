"""The recommender interface and the model registry.

A :class:`Recommender` scores every item for a batch of users from their interaction history. It is
either *closed-form* (``iterative = False``: :meth:`Recommender.fit` on the training matrix, done) or
*iterative* (``iterative = True``: the training loop in :mod:`fishertune.recsys.train` calls
:meth:`Recommender.training_step` on batches of training rows). The loop never needs to know which
model it trains, so a new model is one module: a config class and a registered model class.

Each model has a pydantic config (a :class:`fishertune.config.StrictModel`) whose ``name`` field is a
``Literal`` naming the model; :data:`fishertune.recsys.models.ModelConfig` is the discriminated union of
them, so a YAML ``model: {name: ease, lambda_: 300}`` validates into an ``EASEConfig``.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, TypeVar

import scipy.sparse as sp
import torch
from torch import Tensor, nn

from fishertune.config import ConfigError, StrictModel

__all__ = ["Recommender", "register_model", "get_model_class", "registered_models", "build_model"]


class Recommender(nn.Module):
    """Base of every recommender.

    ``score(users, history)`` returns ``B x n_items`` scores, higher = ranked first (the evaluator masks
    the history itself). ``users`` are user indices (models without user embeddings ignore them);
    ``history`` is the users' dense binary input rows. ``forward`` is ``training_step`` so that a
    :class:`~torch.nn.parallel.DistributedDataParallel` wrapper synchronises gradients of the step.
    """

    iterative: ClassVar[bool] = False
    config_class: ClassVar[type[StrictModel]]
    name: ClassVar[str]

    def __init__(self, cfg: StrictModel, n_users: int, n_items: int) -> None:
        super().__init__()
        if n_items < 1 or n_users < 0:
            raise ValueError(f"{type(self).__name__}: need n_items >= 1 and n_users >= 0, got "
                             f"n_users={n_users}, n_items={n_items}")
        self.cfg = cfg
        self.n_users = int(n_users)
        self.n_items = int(n_items)

    def score(self, users: Tensor, history: Tensor) -> Tensor:
        """``B x n_items`` ranking scores for ``users`` with input rows ``history`` (``B x n_items``)."""
        raise NotImplementedError

    def fit(self, train: sp.csr_matrix) -> None:
        """Closed-form models: fit on the ``n_users x n_items`` training matrix."""
        raise NotImplementedError(f"{type(self).__name__} is iterative: train it with fishertune.recsys.train")

    def training_step(self, batch: Tensor, step: int) -> dict[str, Tensor]:
        """Iterative models: the loss of one batch (dense training rows, ``B x n_items``) at global
        optimiser step ``step`` (0-based). Returns ``{"loss": scalar, **logged_terms}``."""
        raise NotImplementedError(f"{type(self).__name__} is closed-form: call fit(train)")

    def forward(self, batch: Tensor, step: int) -> dict[str, Tensor]:  # noqa: D401 - see class doc
        return self.training_step(batch, step)

    def device(self) -> torch.device:
        """Where the model's parameters / buffers live (CPU for a model with neither)."""
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def _check_history(self, history: Tensor) -> None:
        if history.dim() != 2 or history.shape[1] != self.n_items:
            raise ValueError(f"{type(self).__name__}.score: history must be B x {self.n_items}, "
                             f"got {tuple(history.shape)}")


R = TypeVar("R", bound=type[Recommender])
_REGISTRY: dict[str, type[Recommender]] = {}


def register_model(name: str) -> Callable[[R], R]:
    """Class decorator: register a :class:`Recommender` under ``name`` (its config's ``name`` literal).

    The class must set ``config_class``, a StrictModel whose ``name`` field defaults to ``name``.
    """

    def deco(cls: R) -> R:
        if not (isinstance(cls, type) and issubclass(cls, Recommender)):
            raise TypeError(f"register_model({name!r}): {cls!r} is not a Recommender subclass")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        config_class = getattr(cls, "config_class", None)
        if config_class is None or config_class.model_fields.get("name") is None:
            raise TypeError(f"register_model({name!r}): {cls.__qualname__}.config_class must be a config "
                            "with a 'name' field")
        if config_class.model_fields["name"].default != name:
            raise TypeError(f"register_model({name!r}): {config_class.__qualname__}.name defaults to "
                            f"{config_class.model_fields['name'].default!r}, not {name!r}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def registered_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model_class(name: str) -> type[Recommender]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; registered: {', '.join(registered_models())}") from None


def build_model(cfg: StrictModel | dict[str, Any], n_users: int, n_items: int,
                seed: int | None = None) -> Recommender:
    """Instantiate the model named by ``cfg.name`` (a config object or a plain dict).

    ``seed``: initialise the parameters from this seed without touching the global RNG streams (so
    that a run's weights do not depend on what ran before it); ``None`` uses the global RNG.
    """
    if isinstance(cfg, dict):
        if "name" not in cfg:
            raise ConfigError(f"model config has no 'name'; registered: {', '.join(registered_models())}")
        cls = get_model_class(str(cfg["name"]))
        from fishertune.config import validate

        cfg = validate(cls.config_class, cfg, source=f"model '{cfg['name']}'")
    cls = get_model_class(getattr(cfg, "name", ""))
    if not isinstance(cfg, cls.config_class):
        raise ConfigError(f"model {cls.name!r} needs a {cls.config_class.__name__}, got {type(cfg).__name__}")
    if seed is None:
        return cls(cfg, n_users, n_items)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(cfg, n_users, n_items)
