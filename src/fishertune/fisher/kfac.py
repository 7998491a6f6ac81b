"""K-FAC: Kronecker-factored Fisher blocks for ``nn.Linear`` and ``nn.Conv2d``, and natural-gradient
optimizer wrappers (K-FAC and diagonal).

For a layer with per-sample input ``a`` (a 1 appended when there is a bias) and per-sample output
gradient ``g`` (of the per-sample negative log-likelihood), the Fisher block of ``[W, b]`` (flattened
row-major, shape ``[out, in+1]``) is ``E[(g g^T) kron (a a^T)]``; K-FAC approximates it by
``G kron A`` with ``A = E[a a^T]`` and ``G = E[g g^T]``. This is exact when the inputs are the same for
every sample (or there is one sample). Sequence inputs (3-D) are treated position by position
("expand" convention): every position contributes to ``A`` and ``G``, ``G`` is divided by the number of
samples only. Conv2d uses unfolded patches (KFC, Grosse & Martens 2016): ``A`` averages over samples
and positions, ``G`` sums over positions and averages over samples.

Natural gradient of a weight gradient ``dW`` (with the bias as the last column):
``(G + sqrt(lambda)/pi I)^-1 dW (A + pi sqrt(lambda) I)^-1`` (factored Tikhonov damping, ``pi`` balances
the two traces).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fishertune.fisher.estimators import _frozen, _to, default_batch
from fishertune.fisher.likelihoods import Likelihood, get_likelihood
from fishertune.utils.progress import track

SUPPORTED = (nn.Linear, nn.Conv2d)


def _inputs_2d(module: nn.Module, x: Tensor) -> Tensor:
    """Per-row layer inputs ``[rows, in(+1)]`` (rows = samples, positions or patches)."""
    if isinstance(module, nn.Linear):
        a = x.reshape(-1, x.shape[-1])
    else:
        if module.padding_mode != "zeros" or isinstance(module.padding, str) or module.groups != 1:
            raise ValueError(f"K-FAC supports Conv2d with zero integer padding and groups=1, got {module}")
        unf = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
        a = unf.transpose(1, 2).reshape(-1, unf.shape[1])
    if module.bias is not None:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
    return a


def _grads_2d(module: nn.Module, go: Tensor) -> Tensor:
    if isinstance(module, nn.Linear):
        return go.reshape(-1, go.shape[-1])
    return go.flatten(2).transpose(1, 2).reshape(-1, go.shape[1])


@dataclass
class KFACBlock:
    """Factors of one layer; ``A``: ``[in(+1), in(+1)]``, ``G``: ``[out, out]``."""

    A: Tensor
    G: Tensor
    has_bias: bool
    weight_shape: tuple[int, ...]

    def dense(self) -> Tensor:
        """``G kron A``: the approximated Fisher block of ``[W, b]`` flattened row-major (for tests)."""
        return torch.kron(self.G, self.A)

    def pi(self) -> float:
        ta = float(self.A.diagonal().mean())
        tg = float(self.G.diagonal().mean())
        return math.sqrt(ta / tg) if ta > 0 and tg > 0 else 1.0

    def inverses(self, damping: float, pi: bool = True) -> tuple[Tensor, Tensor]:
        p = self.pi() if pi else 1.0
        s = math.sqrt(damping)
        eye_a = torch.eye(self.A.shape[0], dtype=self.A.dtype, device=self.A.device)
        eye_g = torch.eye(self.G.shape[0], dtype=self.G.dtype, device=self.G.device)
        return (torch.cholesky_inverse(torch.linalg.cholesky(self.A + p * s * eye_a)),
                torch.cholesky_inverse(torch.linalg.cholesky(self.G + s / p * eye_g)))

    def precondition(self, grad_w: Tensor, grad_b: Tensor | None, A_inv: Tensor, G_inv: Tensor
                     ) -> tuple[Tensor, Tensor | None]:
        """``G^-1 [dW, db] A^-1`` reshaped back to the parameter shapes."""
        m = grad_w.reshape(grad_w.shape[0], -1)
        if self.has_bias:
            m = torch.cat([m, grad_b.reshape(-1, 1)], dim=1)
        out = G_inv @ m.to(G_inv.dtype) @ A_inv
        if self.has_bias:
            return out[:, :-1].reshape(grad_w.shape).to(grad_w.dtype), out[:, -1].to(grad_b.dtype)
        return out.reshape(grad_w.shape).to(grad_w.dtype), None


def _modules(model: nn.Module, modules: Sequence[str] | None) -> dict[str, nn.Module]:
    found = {n: m for n, m in model.named_modules() if isinstance(m, SUPPORTED)
             and any(p.requires_grad for p in m.parameters(recurse=False))}
    if modules is not None:
        missing = [n for n in modules if n not in found]
        if missing:
            raise ValueError(f"K-FAC: {missing} are not trainable Linear/Conv2d modules; candidates: {list(found)}")
        found = {n: found[n] for n in modules}
    if not found:
        raise ValueError("K-FAC: the model has no trainable nn.Linear / nn.Conv2d layer")
    return found


def kfac_factors(model: nn.Module, loader: Iterable, likelihood: str | Likelihood | Callable = "categorical",
                 kind: str = "empirical", n_samples: int = 1, modules: Sequence[str] | None = None,
                 device: str | torch.device | None = None,
                 batch_to_inputs: Callable[[Any], tuple[tuple, Tensor]] | None = None,
                 generator: torch.Generator | None = None, progress: bool = True) -> dict[str, KFACBlock]:
    """K-FAC factors of every (or the named) Linear/Conv2d layer over a loader; ``kind`` is
    ``"empirical"`` (observed targets) or ``"true"`` (``n_samples`` targets drawn from the model)."""
    if kind not in ("empirical", "true"):
        raise ValueError(f"kind must be 'empirical' or 'true', got {kind!r}")
    lik = get_likelihood(likelihood)
    mods = _modules(model, modules)
    split = batch_to_inputs or default_batch
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    sums: dict[str, list[Tensor | None]] = {n: [None, None] for n in mods}
    n_total = 0
    saved: dict[str, tuple[Tensor, Tensor]] = {}

    def hook(name, module, args, output):
        saved[name] = (args[0].detach(), output)

    handles = [m.register_forward_hook(lambda mod, a, o, n=n: hook(n, mod, a, o)) for n, m in mods.items()]
    try:
        with _frozen(model, False):
            for p in model.parameters():  # outputs of the hooked layers must carry gradients
                p.requires_grad_(True)
            for batch in (track(loader, "k-fac") if progress else loader):
                inputs, target = split(batch)
                inputs, target = _to(tuple(inputs), dev), _to(target, dev)
                saved.clear()
                out = model(*inputs)
                B = target.shape[0]
                outs = [saved[n][1] for n in mods]
                for n, m in mods.items():
                    a = _inputs_2d(m, saved[n][0].double() if saved[n][0].dtype == torch.float64 else saved[n][0].float())
                    A = a.t() @ a / (a.shape[0] / B)  # sum over samples of the per-sample mean over rows
                    sums[n][0] = A if sums[n][0] is None else sums[n][0] + A
                passes = [target] if kind == "empirical" else [lik.sample(out, target, 1.0, generator)
                                                               for _ in range(n_samples)]
                for k, y in enumerate(passes):
                    nll, _ = lik.nll(out, y)
                    grads = torch.autograd.grad(nll.sum(), outs, retain_graph=k < len(passes) - 1)
                    for (n, m), go in zip(mods.items(), grads):
                        g = _grads_2d(m, go.float() if go.dtype != torch.float64 else go)
                        G = g.t() @ g / len(passes)
                        sums[n][1] = G if sums[n][1] is None else sums[n][1] + G
                n_total += B
    finally:
        for h in handles:
            h.remove()
    if n_total == 0:
        raise ValueError("the loader yielded no batches")
    return {n: KFACBlock(sums[n][0] / n_total, sums[n][1] / n_total, m.bias is not None, tuple(m.weight.shape))
            for n, m in mods.items()}


class KFACOptimizer:
    """Natural-gradient wrapper: ``step()`` replaces each K-FAC layer's gradient by
    ``G^-1 dW A^-1`` and calls the base optimizer (other parameters keep their gradients).

    Factors come from the training backward itself (empirical Fisher of the training loss): forward
    hooks keep layer inputs, tensor hooks the output gradients, every ``update_freq`` steps, as an
    exponential moving average with ``decay``. ``loss_reduction`` says how the training loss combines
    samples (``"mean"`` gradients are rescaled by the batch size to per-sample gradients).

    The two options of :class:`DiagonalNaturalGradient`, for K-FAC's layers: ``rescale_moments``
    rescales the optimizer's moments at each factor update by the change of the preconditioner's
    *diagonal* (``G^-1_ii A^-1_jj``; exact only where the factors are diagonal, an approximation
    otherwise); ``precondition_decay`` preconditions the optimizer's L2 decay with the gradient,
    ``G^-1 (dW + wd W) A^-1`` (AdamW's decoupled decay is left alone).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, damping: float = 1e-3,
                 update_freq: int = 10, decay: float = 0.95, modules: Sequence[str] | None = None,
                 loss_reduction: str = "mean", pi: bool = True, rescale_moments: bool = False,
                 precondition_decay: bool = False):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if update_freq < 1 or not 0 <= decay < 1 or damping <= 0:
            raise ValueError("need update_freq >= 1, 0 <= decay < 1 and damping > 0")
        self.model, self.optimizer = model, optimizer
        self.damping, self.update_freq, self.decay, self.pi = damping, update_freq, decay, pi
        self.loss_reduction = loss_reduction
        self.rescale_moments, self.precondition_decay = rescale_moments, precondition_decay
        self.mods = _modules(model, modules)
        self.blocks: dict[str, KFACBlock] = {}
        self.inverses: dict[str, tuple[Tensor, Tensor]] = {}
        self.steps = 0
        self._captured: dict[str, dict[str, Any]] = {}
        self._wd: tuple[tuple, dict[int, float]] | None = None  # (decay_key, l2_decay), rebuilt when the key changes
        self._handles = [m.register_forward_hook(self._forward_hook(n)) for n, m in self.mods.items()]

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def _capturing(self) -> bool:
        return self.steps % self.update_freq == 0 and torch.is_grad_enabled() and self.model.training

    def _forward_hook(self, name: str):
        def hook(module, args, output):
            if not self._capturing() or not output.requires_grad or name in self._captured:
                return  # a layer called several times per step contributes its first call
            x = args[0].detach()
            entry: dict[str, Any] = {"a": _inputs_2d(module, x.float()), "B": x.shape[0]}
            self._captured[name] = entry

            def grad_hook(go):
                g = _grads_2d(module, go.detach().float())
                entry["g"] = g * entry["B"] if self.loss_reduction == "mean" else g
            output.register_hook(grad_hook)
        return hook

    def _update(self) -> None:
        for n, m in self.mods.items():
            entry = self._captured.get(n)
            if entry is None or "g" not in entry:
                continue
            a, B, g = entry["a"], entry["B"], entry["g"]
            A = a.t() @ a / a.shape[0]
            G = g.t() @ g / B
            old = self.blocks.get(n)
            if old is not None:
                A = self.decay * old.A + (1 - self.decay) * A
                G = self.decay * old.G + (1 - self.decay) * G
            self.blocks[n] = KFACBlock(A, G, m.bias is not None, tuple(m.weight.shape))
            new = self.blocks[n].inverses(self.damping, self.pi)
            if self.rescale_moments:
                self._rescale(m, self.inverses.get(n), new)
            self.inverses[n] = new
        self._captured.clear()

    def _rescale(self, m: nn.Module, old: tuple[Tensor, Tensor] | None, new: tuple[Tensor, Tensor]) -> None:
        """Rescale the optimizer's moments of ``m`` by the change of the preconditioner's diagonal
        (from 1, no preconditioning, before the first factors)."""
        def diag(inv: tuple[Tensor, Tensor]) -> Tensor:  # [out, in(+1)]: G^-1_ii A^-1_jj
            A_inv, G_inv = inv
            return torch.outer(G_inv.diagonal(), A_inv.diagonal())
        r = diag(new) if old is None else diag(new) / diag(old)
        w = m.weight
        ratios = {w: r[:, :w[0].numel()].reshape(w.shape).to(w.dtype)}
        if m.bias is not None:
            ratios[m.bias] = r[:, -1].to(m.bias.dtype)
        rescale_moments(self.optimizer, ratios)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def precondition(self) -> None:
        """Update the factors when this step captured them, then replace each K-FAC layer's gradient
        (what :meth:`step` does before the optimizer's step)."""
        if self._captured:
            self._update()
        wd: dict[int, float] = {}
        if self.precondition_decay:
            key = decay_key(self.optimizer)
            if self._wd is None or self._wd[0] != key:
                self._wd = (key, l2_decay(self.optimizer))
            wd = self._wd[1]
        for n, m in self.mods.items():
            if n not in self.inverses or m.weight.grad is None:
                continue
            A_inv, G_inv = self.inverses[n]
            gb = m.bias.grad if m.bias is not None else None
            if m.bias is not None and gb is None:
                gb = torch.zeros_like(m.bias)
            dw = wd.get(id(m.weight), 0.0)
            db = wd.get(id(m.bias), 0.0) if m.bias is not None else 0.0
            gw = m.weight.grad + dw * m.weight if dw else m.weight.grad
            gb = gb + db * m.bias if db else gb
            w, b = self.blocks[n].precondition(gw, gb, A_inv, G_inv)
            # the optimizer adds wd * theta itself: take it out, so that the update is G^-1 (g + wd theta) A^-1
            m.weight.grad.copy_(w - dw * m.weight if dw else w)
            if b is not None:
                m.bias.grad = b - db * m.bias if db else b
        self.steps += 1

    def step(self, closure=None):
        self.precondition()
        return self.optimizer.step(closure)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


# optimizer state entries that are running sums of gradients (scale with the gradient) or of squared
# gradients (scale with its square): Adam / AdamW / NAdam / RAdam, SGD momentum, RMSprop, Adagrad
_FIRST_MOMENTS = ("exp_avg", "momentum_buffer", "grad_avg")
_SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum")


def decay_key(optimizer: torch.optim.Optimizer) -> tuple:
    """What :func:`l2_decay` depends on (the optimizer, each group's weight-decay settings): a cache key."""
    return (id(optimizer), tuple((float(g.get("weight_decay", 0.0) or 0.0),
                                  bool(g.get("decoupled_weight_decay", False)), len(g["params"]))
                                 for g in optimizer.param_groups))


def l2_decay(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    """``id(param) -> weight_decay`` for the parameters whose optimizer adds an L2 term ``wd * theta`` to
    the gradient (not AdamW's or another decoupled decay, which does not scale with the gradient)."""
    if isinstance(optimizer, torch.optim.AdamW):
        return {}
    out: dict[int, float] = {}
    for g in optimizer.param_groups:
        w = float(g.get("weight_decay", 0.0) or 0.0)
        if w > 0 and not g.get("decoupled_weight_decay", False):
            out.update({id(p): w for p in g["params"]})
    return out


@torch.no_grad()
def rescale_moments(optimizer: torch.optim.Optimizer, ratios: dict[Tensor, Tensor]) -> int:
    """Make an optimizer's moment estimates match a changed gradient preconditioner.

    ``ratios[p]`` is the new over the old per-entry multiplier of ``p``'s gradient (e.g. ``(F_old + d) /
    (F_new + d)`` when a diagonal natural gradient's Fisher is refreshed, ``1 / (F + d)`` when it starts).
    First moments are multiplied by it, second moments by its square: the state becomes what it would be
    had every past gradient been preconditioned the new way. Without this, Adam's slow second moment
    (``beta2 = 0.999``) lags a preconditioner that jumps by orders of magnitude, and the first steps after
    each change are that much too large. Returns the number of parameters rescaled (those with state)."""
    n = 0
    for p, r in ratios.items():
        state = optimizer.state.get(p)
        if not state:
            continue
        r = r.to(device=p.device)
        for key in _FIRST_MOMENTS:
            if isinstance(state.get(key), Tensor) and state[key].shape == p.shape:
                state[key].mul_(r.to(state[key].dtype))
        for key in _SECOND_MOMENTS:
            if isinstance(state.get(key), Tensor) and state[key].shape == p.shape:
                state[key].mul_(r.square().to(state[key].dtype))
        n += 1
    return n


class DiagonalNaturalGradient:
    """``grad <- grad / (F + damping)`` with a diagonal Fisher (a FisherResult or ``{name: tensor}``),
    then the base optimizer's step. ``set_fisher`` replaces the estimate (e.g. recomputed each epoch);
    ``fisher=None`` starts without one (no preconditioning until the first ``set_fisher``).

    Two options keep the base optimizer consistent with the preconditioner (both off: plain division):

    - ``rescale_moments``: each ``set_fisher`` rescales the optimizer's moments from the old multiplier
      (1 before the first Fisher) to the new one (:func:`rescale_moments`);
    - ``precondition_decay``: the optimizer's L2 weight decay is preconditioned too. ``(1 / (F + d) - 1)
      * wd * theta`` is added to the gradient, so that with the ``wd * theta`` the optimizer adds in its
      step the update follows ``(g + wd * theta) / (F + d)``, the natural gradient of the regularised
      loss (AdamW's decoupled decay does not scale with the gradient and is left alone).

    The denominators and decay coefficients are computed once per Fisher (and damping / weight decay
    settings): :meth:`precondition` is one foreach division and one foreach multiply-add per step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, fisher=None, damping: float = 1e-3,
                 rescale_moments: bool = False, precondition_decay: bool = False):
        if damping <= 0:
            raise ValueError("damping must be > 0")
        self.model, self.optimizer, self.damping = model, optimizer, damping
        self.rescale_moments, self.precondition_decay = rescale_moments, precondition_decay
        self.params = dict(model.named_parameters())
        self.fisher: dict[str, Tensor] = {}
        self._cache: tuple | None = None
        if fisher is not None:
            self.set_fisher(fisher)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def set_fisher(self, fisher, rescale: bool | None = None) -> None:
        """Replace the Fisher; ``rescale`` (default: the ``rescale_moments`` option) rescales the
        optimizer's moments to the new preconditioner (``False`` for a state that already matches it,
        e.g. one restored from a checkpoint)."""
        f = dict(fisher.items())
        for n, t in f.items():
            if n not in self.params:
                raise ValueError(f"Fisher entry {n!r} is not a parameter of the model")
            if tuple(t.shape) != tuple(self.params[n].shape):
                raise ValueError(f"Fisher entry {n!r} has shape {tuple(t.shape)}, the parameter "
                                 f"{tuple(self.params[n].shape)}")
        new = {n: t.to(self.params[n].device) for n, t in f.items()}
        if self.rescale_moments if rescale is None else rescale:
            d, ratios = self.damping, {}
            for n, t in new.items():
                p = self.params[n]
                t = t.to(torch.float64 if p.dtype == torch.float64 else torch.float32)
                ratios[p] = (self.fisher[n].to(t) + d) / (t + d) if n in self.fisher else 1.0 / (t + d)
            rescale_moments(self.optimizer, ratios)
        self.fisher, self._cache = new, None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def _coefficients(self) -> tuple[list[Tensor], list[Tensor], list[Tensor | None]]:
        """Parameters, ``F + d`` and the decay coefficients ``wd * (1 / (F + d) - 1)`` (None: no L2 decay)."""
        wd = l2_decay(self.optimizer) if self.precondition_decay else {}
        ps = [self.params[n] for n in self.fisher]
        denoms = [(f + self.damping).to(p.dtype) for f, p in zip(self.fisher.values(), ps)]
        coefs = [(wd[id(p)] * (1.0 / d - 1.0)).to(p.dtype) if id(p) in wd else None for p, d in zip(ps, denoms)]
        return ps, denoms, coefs

    @torch.no_grad()
    def precondition(self) -> None:
        """Precondition the gradients in place (what :meth:`step` does before the optimizer's step)."""
        key = (float(self.damping), decay_key(self.optimizer) if self.precondition_decay else ())
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, *self._coefficients())
        _, ps, denoms, coefs = self._cache
        grads, dens, d_grads, d_params, d_coefs = [], [], [], [], []
        for p, d, c in zip(ps, denoms, coefs):
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                g.div_(d)
                continue
            grads.append(g)
            dens.append(d)
            if c is not None:
                d_grads.append(g)
                d_params.append(p.detach())
                d_coefs.append(c)
        if grads:
            torch._foreach_div_(grads, dens)
        if d_grads:
            torch._foreach_addcmul_(d_grads, d_params, d_coefs)

    def step(self, closure=None):
        self.precondition()
        return self.optimizer.step(closure)
