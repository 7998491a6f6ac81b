"""Likelihoods: per-sample negative log-likelihoods, predictive sampling and the output-space Fisher.

A likelihood turns the model output of one batch into

- ``nll(output, target, token_level)`` -> ``(losses, count)``: per-sample negative log-likelihoods
  (shape ``[B]``, summed over every other dimension), or per position in token-level mode (shape
  ``[B, T]``, zero where a position is masked); ``count`` is how many samples (or valid tokens) the
  batch holds. The Fisher engine differentiates ``losses.sum()``, so the gradient each sample's rows
  receive is the gradient of that sample's own log-likelihood.
- ``sample(output, target, temperature, generator)``: targets drawn from the model's predictive
  distribution (the "true" / Monte-Carlo Fisher); masked positions of ``target`` stay masked.
- ``sqrt_factor(output, token_level, temperature)``: columns ``s_k`` (each shaped like the output) with
  ``sum_k s_k s_k^T`` = the Fisher of the likelihood with respect to the output (its Hessian for these
  exponential families). Backpropagating every column and squaring the per-sample gradients gives the
  exact Fisher diagonal, which equals the GGN diagonal. The number of columns is the number of
  backward passes: ``n_columns`` lets the caller refuse when it is too large.

Everything is computed in float32 (float64 for float64 outputs), also under autocast.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
from torch import Tensor
from torch.nn import functional as F


def _acc(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.float()


class Likelihood:
    """Base class; see the module docstring for the contract."""

    name = "likelihood"

    def nll(self, output: Tensor, target: Tensor, token_level: bool = False) -> tuple[Tensor, int | Tensor]:
        raise NotImplementedError

    def sample(self, output: Tensor, target: Tensor | None, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError(f"likelihood {self.name!r} cannot sample targets (kind='true')")

    def n_columns(self, output: Tensor, token_level: bool = False) -> int:
        raise NotImplementedError(f"likelihood {self.name!r} has no exact Fisher (kind='exact')")

    def sqrt_factor(self, output: Tensor, target: Tensor | None, token_level: bool = False,
                    temperature: float = 1.0) -> Iterator[Tensor]:
        raise NotImplementedError(f"likelihood {self.name!r} has no exact Fisher (kind='exact')")


def _check_token_output(name: str, output: Tensor, min_dim: int) -> None:
    if output.dim() < min_dim:
        raise ValueError(f"{name} likelihood with token_level=True needs an output of at least {min_dim} "
                         f"dimensions [batch, positions, ...], got shape {tuple(output.shape)}")


class Categorical(Likelihood):
    """Softmax cross-entropy. ``output``: logits ``[B, C]`` or ``[B, T, C]``; ``target``: class ids
    ``[B]`` or ``[B, T]`` where ``ignore_index`` marks positions without a label."""

    name = "categorical"

    def __init__(self, ignore_index: int = -100):
        self.ignore_index = ignore_index

    def _check(self, output: Tensor, target: Tensor) -> None:
        if output.dim() < 2 or tuple(target.shape) != tuple(output.shape[:-1]):
            raise ValueError(f"categorical likelihood: logits {tuple(output.shape)} need targets of shape "
                             f"{tuple(output.shape[:-1])}, got {tuple(target.shape)}")
        if target.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError("categorical likelihood: targets must be integer class ids")

    def nll(self, output, target, token_level=False):
        self._check(output, target)
        x = _acc(output)
        if x.dim() > 2:  # cross_entropy wants the classes in dimension 1
            x = x.movedim(-1, 1)
        losses = F.cross_entropy(x, target, ignore_index=self.ignore_index, reduction="none")
        if token_level:
            _check_token_output(self.name, output, 3)
            return losses.reshape(losses.shape[0], -1), (target != self.ignore_index).sum()
        return losses.reshape(losses.shape[0], -1).sum(1), output.shape[0]

    def sample(self, output, target, temperature=1.0, generator=None):
        probs = torch.softmax(_acc(output.detach()) / temperature, dim=-1)
        flat = probs.reshape(-1, probs.shape[-1])
        drawn = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
        if target is not None:
            drawn = torch.where(target == self.ignore_index, target, drawn)
        return drawn

    def n_columns(self, output, token_level=False):
        positions = math.prod(output.shape[1:-1])
        return output.shape[-1] * (1 if token_level else positions)

    def sqrt_factor(self, output, target, token_level=False, temperature=1.0):
        logits = _acc(output.detach())
        p = torch.softmax(logits, dim=-1)
        # weights: the (possibly tempered) predictive distribution the targets are drawn from
        w = p if temperature == 1.0 else torch.softmax(logits / temperature, dim=-1)
        if target is not None:
            w = w * (target != self.ignore_index).unsqueeze(-1)
        B, C = output.shape[0], output.shape[-1]
        pos_shape = output.shape[1:-1]
        n_pos = math.prod(pos_shape)
        p3, w3 = p.reshape(B, n_pos, C), w.reshape(B, n_pos, C)
        eye = torch.eye(C, dtype=p.dtype, device=p.device)
        positions = [slice(None)] if token_level or n_pos == 1 else [slice(t, t + 1) for t in range(n_pos)]
        for pos in positions:
            for c in range(C):
                col = torch.zeros_like(p3)
                col[:, pos] = w3[:, pos, c:c + 1].sqrt() * (p3[:, pos] - eye[c])
                yield col.reshape(output.shape)


class Multinomial(Likelihood):
    """Multinomial over items (Mult-VAE): ``-sum_j x_j log softmax(z)_j`` per sample. ``output``:
    logits ``[B, V]``; ``target``: counts ``[B, V]`` (dense or torch sparse, typically binary)."""

    name = "multinomial"

    def nll(self, output, target, token_level=False):
        if token_level:
            raise ValueError("multinomial likelihood has no token-level mode (one sample = one user row)")
        if target.is_sparse:
            target = target.to_dense()
        if tuple(target.shape) != tuple(output.shape):
            raise ValueError(f"multinomial likelihood: logits {tuple(output.shape)} and counts "
                             f"{tuple(target.shape)} must have the same shape")
        logp = torch.log_softmax(_acc(output), dim=-1)
        return -(logp * target.to(logp.dtype)).reshape(output.shape[0], -1).sum(1), output.shape[0]

    def sample(self, output, target, temperature=1.0, generator=None):
        """Draw ``N_i = sum_j x_ij`` items per row (1 where no target is given) from the softmax."""
        probs = torch.softmax(_acc(output.detach()) / temperature, dim=-1)
        B, V = probs.shape
        if target is None:
            n = torch.ones(B, dtype=torch.long, device=probs.device)
        else:
            n = (target.to_dense() if target.is_sparse else target).sum(-1).round().long()
        n_max = int(n.max()) if B else 0
        counts = torch.zeros_like(probs)
        if n_max == 0:
            return counts
        draws = torch.multinomial(probs, n_max, replacement=True, generator=generator)
        keep = torch.arange(n_max, device=probs.device).unsqueeze(0) < n.unsqueeze(1)
        counts.scatter_add_(1, draws, keep.to(counts.dtype))
        return counts

    def n_columns(self, output, token_level=False):
        return output.shape[-1] + 1

    def sqrt_factor(self, output, target, token_level=False, temperature=1.0):
        """The Fisher wrt logits is ``N (diag(p) - p p^T)`` with ``N`` the row's count."""
        logits = _acc(output.detach())
        p = torch.softmax(logits, dim=-1)
        w = p if temperature == 1.0 else torch.softmax(logits / temperature, dim=-1)
        if target is None:
            n = torch.ones(p.shape[0], dtype=p.dtype, device=p.device)
        else:
            n = (target.to_dense() if target.is_sparse else target).to(p.dtype).sum(-1)
        eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
        for c in range(p.shape[-1]):
            yield (n.unsqueeze(-1) * w[:, c:c + 1]).sqrt() * (p - eye[c])
        if temperature != 1.0:
            # counts ~ Mult(N, w): E[(Np - x)(Np - x)^T] = N(diag w - w w^T) + N^2 (p - w)(p - w)^T;
            # the columns above give N(diag w - w w^T) + N (p - w)(p - w)^T
            yield (n * (n - 1)).clamp_min(0).sqrt().unsqueeze(-1) * (p - w)


class Bernoulli(Likelihood):
    """Independent Bernoulli outputs (BCE with logits). ``output`` and ``target`` have the same shape;
    in token-level mode dimension 1 indexes positions."""

    name = "bernoulli"

    def nll(self, output, target, token_level=False):
        if tuple(target.shape) != tuple(output.shape):
            raise ValueError(f"bernoulli likelihood: logits {tuple(output.shape)} and targets "
                             f"{tuple(target.shape)} must have the same shape")
        x = _acc(output)
        losses = F.binary_cross_entropy_with_logits(x, target.to(x.dtype), reduction="none")
        return _elementwise_nll(self.name, losses, output, token_level)

    def sample(self, output, target, temperature=1.0, generator=None):
        return torch.bernoulli(torch.sigmoid(_acc(output.detach()) / temperature), generator=generator)

    def n_columns(self, output, token_level=False):
        return math.prod(output.shape[2 if token_level else 1:]) + 1

    def sqrt_factor(self, output, target, token_level=False, temperature=1.0):
        x = _acc(output.detach())
        p = torch.sigmoid(x)
        w = p if temperature == 1.0 else torch.sigmoid(x / temperature)
        # y ~ Bernoulli(w): E[(p - y)(p - y)^T] = diag(w (1 - w)) + (p - w)(p - w)^T
        yield from _unit_columns((w * (1 - w)).sqrt(), token_level)
        if temperature != 1.0:
            yield p - w


class Gaussian(Likelihood):
    """Gaussian with fixed variance ``sigma**2`` (MSE up to a constant): ``0.5 |y - mu|^2 / sigma^2``."""

    name = "gaussian"

    def __init__(self, sigma: float = 1.0):
        if sigma <= 0:
            raise ValueError(f"gaussian likelihood: sigma must be > 0, got {sigma}")
        self.sigma = float(sigma)

    def nll(self, output, target, token_level=False):
        if tuple(target.shape) != tuple(output.shape):
            raise ValueError(f"gaussian likelihood: predictions {tuple(output.shape)} and targets "
                             f"{tuple(target.shape)} must have the same shape")
        x = _acc(output)
        losses = 0.5 * (x - target.to(x.dtype)) ** 2 / self.sigma ** 2
        return _elementwise_nll(self.name, losses, output, token_level)

    def sample(self, output, target, temperature=1.0, generator=None):
        mu = _acc(output.detach())
        noise = torch.randn(mu.shape, dtype=mu.dtype, device=mu.device, generator=generator)
        return mu + self.sigma * math.sqrt(temperature) * noise

    def n_columns(self, output, token_level=False):
        return math.prod(output.shape[2 if token_level else 1:])

    def sqrt_factor(self, output, target, token_level=False, temperature=1.0):
        # E[(y - mu)(y - mu)^T] / sigma^4 with Var y = T sigma^2  ->  T / sigma^2 on the diagonal
        scale = torch.full_like(_acc(output.detach()), math.sqrt(temperature) / self.sigma)
        yield from _unit_columns(scale, token_level)


def _elementwise_nll(name: str, losses: Tensor, output: Tensor, token_level: bool) -> tuple[Tensor, int]:
    """Sum element-wise losses per sample ``[B]`` (per token ``[B, T]`` in token-level mode)."""
    if token_level:
        _check_token_output(name, output, 2)
        per = losses.reshape(output.shape[0], output.shape[1], -1).sum(-1)
        return per, per.numel()
    return losses.reshape(output.shape[0], -1).sum(1), output.shape[0]


def _unit_columns(scale: Tensor, token_level: bool) -> Iterator[Tensor]:
    """One column per output unit (per feature across all positions in token-level mode)."""
    lead = 2 if token_level else 1
    flat = scale.reshape(*scale.shape[:lead], -1)
    for d in range(flat.shape[-1]):
        col = torch.zeros_like(flat)
        col[..., d] = flat[..., d]
        yield col.reshape(scale.shape)


class CallableLikelihood(Likelihood):
    """A user log-likelihood: ``log_prob(output, target) -> [B]`` (``[B, T]`` in token-level mode).
    Optional ``sample(output, target, temperature, generator)`` enables ``kind='true'``."""

    def __init__(self, log_prob: Callable[[Tensor, Tensor], Tensor],
                 sample: Callable[..., Tensor] | None = None, name: str | None = None):
        self.log_prob = log_prob
        self._sample = sample
        self.name = name or getattr(log_prob, "__name__", "callable")

    def nll(self, output, target, token_level=False):
        lp = self.log_prob(output, target)
        if not isinstance(lp, Tensor) or lp.dim() == 0 or lp.shape[0] != output.shape[0]:
            shape = tuple(lp.shape) if isinstance(lp, Tensor) else type(lp).__name__
            raise ValueError(f"likelihood {self.name!r} must return one log-likelihood per sample "
                             f"(shape [{output.shape[0]}{', T' if token_level else ''}]), got {shape}")
        lp = _acc(lp)
        if token_level:
            per = -lp.reshape(lp.shape[0], -1)
            return per, per.numel()
        return -lp.reshape(lp.shape[0], -1).sum(1), output.shape[0]

    def sample(self, output, target, temperature=1.0, generator=None):
        if self._sample is None:
            return super().sample(output, target, temperature, generator)
        return self._sample(output, target, temperature, generator)


LIKELIHOODS: dict[str, Callable[[], Likelihood]] = {
    "categorical": Categorical, "cross_entropy": Categorical, "ce": Categorical,
    "multinomial": Multinomial, "bernoulli": Bernoulli, "bce": Bernoulli,
    "gaussian": Gaussian, "mse": Gaussian,
}


def get_likelihood(spec: str | Likelihood | Callable[[Tensor, Tensor], Tensor]) -> Likelihood:
    """A likelihood from a name (``categorical``, ``multinomial``, ``bernoulli``, ``gaussian`` and
    aliases ``cross_entropy``/``ce``, ``bce``, ``mse``), an instance, or a log-prob callable."""
    if isinstance(spec, Likelihood):
        return spec
    if isinstance(spec, str):
        key = spec.lower()
        if key not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {spec!r}; choose one of {sorted(LIKELIHOODS)} "
                             "or pass a callable log_prob(output, target)")
        return LIKELIHOODS[key]()
    if callable(spec):
        return CallableLikelihood(spec)
    raise TypeError(f"likelihood must be a name, a Likelihood or a callable, got {type(spec).__name__}")
