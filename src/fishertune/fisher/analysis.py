"""Analysis with Fisher information: capacity metrics, spectra through Fisher/GGN-vector products
(Lanczos, stochastic Lanczos quadrature) without forming the matrix, loss sharpness along random and
top-eigen directions, task overlap / interference, and ranked group importance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp

from fishertune.fisher.estimators import _frozen, _to, default_batch, select_parameters
from fishertune.fisher.likelihoods import Likelihood, get_likelihood
from fishertune.fisher.reductions import BY, ranked, reduce

# -- capacity -------------------------------------------------------------------------------------------


def _flat(fisher: Mapping[str, Tensor] | Tensor) -> Tensor:
    if isinstance(fisher, Tensor):
        return fisher.detach().double().reshape(-1)
    return torch.cat([t.detach().double().reshape(-1).cpu() for t in fisher.values()])


def capacity_metrics(fisher: Mapping[str, Tensor] | Tensor, n_samples: int, eps: float = 1e-12,
                     prior_precision: float = 1.0) -> dict[str, float]:
    """Scalar summaries of a diagonal Fisher (or of any nonnegative eigenvalues given as a tensor).

    - ``trace``; ``log_det`` = sum log(F + eps); ``effective_rank`` = (Tr F)^2 / ||F||_F^2;
    - ``condition_number`` = max / min over entries > eps (inf when none is);
    - ``pac_bayes`` = sqrt(Tr F / n), the Fisher-trace complexity term of PAC-Bayes-style bounds;
    - ``effective_dimension`` = sum n F / (n F + prior_precision): parameters the data determines
      (MacKay; Maddox et al. 2020), and the single ``capacity_score`` = effective_dimension / P in [0, 1].
    """
    f = _flat(fisher).clamp_min(0)
    if n_samples <= 0:
        raise ValueError("n_samples must be > 0")
    P = f.numel()
    tr = float(f.sum())
    fro2 = float((f * f).sum())
    pos = f[f > eps]
    d_eff = float((n_samples * f / (n_samples * f + prior_precision)).sum())
    return {
        "n_params": P,
        "trace": tr,
        "log_det": float(torch.log(f + eps).sum()),
        "effective_rank": tr * tr / fro2 if fro2 > 0 else 0.0,
        "condition_number": float(pos.max() / pos.min()) if pos.numel() else math.inf,
        "pac_bayes": math.sqrt(tr / n_samples),
        "effective_dimension": d_eff,
        "capacity_score": d_eff / P if P else 0.0,
    }


# -- matrix-free curvature products -------------------------------------------------------------------


class CurvatureOperator:
    """Products with the full empirical Fisher or the GGN (= true Fisher for these likelihoods) of a
    model over a fixed list of batches, normalised by the number of samples; never formed.

    ``kind="ggn"``: ``v -> (1/N) sum_i J_i^T H_i J_i v`` (forward-mode JVP, the likelihood's output
    Hessian, reverse-mode VJP). ``kind="empirical"``: ``v -> (1/N) sum_i g_i g_i^T v`` computed as the
    VJP of the per-sample losses with their JVP. Vectors are flat over the selected parameters in
    ``named_parameters`` order (``unflatten`` / ``flatten`` convert).
    """

    def __init__(self, model: nn.Module, batches: Iterable, likelihood: str | Likelihood | Callable = "categorical",
                 kind: str = "ggn", params: Sequence[str] | None = None,
                 batch_to_inputs: Callable[[Any], tuple[tuple, Tensor]] | None = None,
                 device: str | torch.device | None = None):
        if kind not in ("ggn", "empirical"):
            raise ValueError(f"kind must be 'ggn' or 'empirical', got {kind!r}")
        self.model, self.kind = model, kind
        self.lik = get_likelihood(likelihood)
        named = select_parameters(model, params)
        self.names = list(named)
        self.shapes = [p.shape for p in named.values()]
        self.primals = {n: p.detach() for n, p in named.items()}
        dev = torch.device(device) if device is not None else next(iter(named.values())).device
        split = batch_to_inputs or default_batch
        self.batches = []
        for b in batches:
            x, y = split(b)
            self.batches.append((_to(tuple(x), dev), _to(y, dev)))
        if not self.batches:
            raise ValueError("no batches")
        self.n = sum(y.shape[0] for _, y in self.batches)
        self.dim = sum(p.numel() for p in named.values())
        self.dtype = next(iter(named.values())).dtype
        self.device = dev
        self.n_products = 0

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for n, s in zip(self.names, self.shapes):
            k = math.prod(s)
            out[n] = v[i:i + k].reshape(s)
            i += k
        return out

    def _out_fn(self, x):
        return lambda theta: functional_call(self.model, theta, x)

    def matvec(self, v: Tensor) -> Tensor:
        tangent = self.unflatten(v.to(self.dtype))
        total = None
        with _frozen(self.model, self.model.training):
            for x, y in self.batches:
                if self.kind == "ggn":
                    out_fn = self._out_fn(x)
                    out, jv = jvp(out_fn, (self.primals,), (tangent,))
                    out = out.detach()
                    loss_of_out = lambda o: self.lik.nll(o, y)[0].sum()  # noqa: E731
                    _, hjv = jvp(grad(loss_of_out), (out,), (jv,))
                    _, back = vjp(out_fn, self.primals)
                    (res,) = back(hjv.to(out.dtype))
                else:
                    def losses(theta):
                        return self.lik.nll(functional_call(self.model, theta, x), y)[0]
                    _, jv = jvp(losses, (self.primals,), (tangent,))
                    _, back = vjp(losses, self.primals)
                    (res,) = back(jv)
                flat = self.flatten(res)
                total = flat if total is None else total + flat
        self.n_products += 1
        return total / self.n

    __matmul__ = matvec

    def dense(self) -> Tensor:
        """The full matrix by ``dim`` products (tests and tiny models only)."""
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        return torch.stack([self.matvec(eye[i]) for i in range(self.dim)], 1)


# -- Lanczos ------------------------------------------------------------------------------------------


@dataclass
class LanczosResult:
    eigenvalues: Tensor  # Ritz values, descending
    eigenvectors: Tensor | None  # [dim, k] Ritz vectors (when requested)
    alphas: Tensor
    betas: Tensor


def lanczos(matvec: Callable[[Tensor], Tensor], dim: int, steps: int, v0: Tensor | None = None,
            return_vectors: bool = False, dtype: torch.dtype = torch.float64,
            device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> LanczosResult:
    """``steps`` Lanczos iterations with full reorthogonalisation (exact in exact arithmetic after
    ``dim`` steps). Returns the Ritz values (descending) and, optionally, the Ritz vectors."""
    steps = min(steps, dim)
    if v0 is None:
        v0 = torch.randn(dim, dtype=dtype, generator=generator).to(device)
    q = v0.to(dtype=dtype, device=device)
    q = q / q.norm()
    Q = torch.zeros(steps, dim, dtype=dtype, device=device)
    alphas, betas = [], []
    for j in range(steps):
        Q[j] = q
        w = matvec(q).to(dtype)
        a = torch.dot(w, q)
        w = w - Q[: j + 1].t() @ (Q[: j + 1] @ w)
        w = w - Q[: j + 1].t() @ (Q[: j + 1] @ w)  # twice is enough
        alphas.append(a)
        b = w.norm()
        if j == steps - 1 or b < 1e-12 * max(1.0, float(abs(a))):
            break
        betas.append(b)
        q = w / b
    k = len(alphas)
    al = torch.stack(alphas)
    be = torch.stack(betas[: k - 1]) if k > 1 else al.new_zeros(0)
    T = torch.diag(al) + torch.diag(be, 1) + torch.diag(be, -1)
    evals, evecs = torch.linalg.eigh(T)
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order], evecs[:, order]
    vecs = Q[:k].t() @ evecs if return_vectors else None
    return LanczosResult(evals, vecs, al, be)


def top_eigenvalues(op: CurvatureOperator, k: int = 5, steps: int | None = None,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Top-``k`` eigenvalues and eigenvectors (columns, flat) of a curvature operator by Lanczos."""
    steps = steps or min(op.dim, max(3 * k, 30))
    res = lanczos(op.matvec, op.dim, steps, return_vectors=True, dtype=torch.float64, device=op.device,
                  generator=generator)
    return res.eigenvalues[:k], res.eigenvectors[:, :k]


def spectral_density(op: CurvatureOperator | Callable[[Tensor], Tensor], dim: int | None = None, steps: int = 30,
                     n_probes: int = 4, n_grid: int = 200, sigma: float | None = None,
                     generator: torch.Generator | None = None, device: str | torch.device = "cpu"
                     ) -> tuple[Tensor, Tensor]:
    """Stochastic Lanczos quadrature (Ghorbani et al. 2019): a Gaussian-smoothed eigenvalue density
    on a grid; the density integrates to 1 and its mean approximates Tr(F)/dim."""
    if isinstance(op, CurvatureOperator):
        matvec, dim, device = op.matvec, op.dim, op.device
    else:
        matvec = op
        if dim is None:
            raise ValueError("dim is required with a plain matvec function")
    nodes, weights = [], []
    for _ in range(n_probes):
        v = torch.randint(0, 2, (dim,), generator=generator).double() * 2 - 1
        res = lanczos(matvec, dim, steps, v0=v.to(device), device=device)
        al, be = res.alphas, res.betas
        T = torch.diag(al) + torch.diag(be, 1) + torch.diag(be, -1)
        ev, U = torch.linalg.eigh(T)
        nodes.append(ev.cpu())
        weights.append((U[0] ** 2).cpu() / n_probes)
    nodes_t, weights_t = torch.cat(nodes), torch.cat(weights)
    lo, hi = float(nodes_t.min()), float(nodes_t.max())
    span = max(hi - lo, 1e-12)
    s = sigma or span / 50
    grid = torch.linspace(lo - 3 * s, hi + 3 * s, n_grid, dtype=torch.float64)
    dens = (weights_t[None, :] * torch.exp(-((grid[:, None] - nodes_t[None, :]) ** 2) / (2 * s * s))).sum(1)
    dens = dens / (s * math.sqrt(2 * math.pi))
    return grid, dens


# -- sharpness ----------------------------------------------------------------------------------------


def sharpness(model: nn.Module, batches: Iterable, loss_fn: Callable[[Any, Tensor], Tensor],
              epsilon: float = 1e-2, n_directions: int = 10, directions: str | Tensor = "random",
              operator: CurvatureOperator | None = None, params: Sequence[str] | None = None,
              batch_to_inputs: Callable[[Any], tuple[tuple, Tensor]] | None = None,
              generator: torch.Generator | None = None) -> dict[str, Any]:
    """Loss increase ``L(theta + epsilon d) - L(theta)`` along unit directions ``d``: ``"random"``
    (Gaussian, normalised), ``"top-eigen"`` (Lanczos eigenvectors of ``operator``), or a ``[dim, k]``
    tensor of directions. Also returns the quadratic prediction ``epsilon^2/2 d^T F d`` when an
    operator is given. Parameters are restored afterwards."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad and (params is None or n in params)}
    split = batch_to_inputs or default_batch
    data = [split(b) for b in batches]
    dim = sum(p.numel() for p in named.values())

    @torch.no_grad()
    def loss() -> float:
        tot, n = 0.0, 0
        for x, y in data:
            tot += float(loss_fn(model(*x), y)) * y.shape[0]
            n += y.shape[0]
        return tot / n

    if isinstance(directions, Tensor):
        D = directions
    elif directions == "random":
        D = torch.randn(dim, n_directions, generator=generator, dtype=torch.float64)
    elif directions == "top-eigen":
        if operator is None:
            raise ValueError("directions='top-eigen' needs operator=CurvatureOperator(...)")
        if list(named) != operator.names:
            raise ValueError("the operator's parameters differ from the ones perturbed")
        _, D = top_eigenvalues(operator, n_directions, generator=generator)
        D = D.cpu()
    else:
        raise ValueError(f"directions must be 'random', 'top-eigen' or a tensor, got {directions!r}")
    D = D / D.norm(dim=0, keepdim=True)
    base = loss()
    original = {n: p.detach().clone() for n, p in named.items()}
    increases, quad = [], []
    try:
        for k in range(D.shape[1]):
            d = D[:, k]
            i = 0
            with torch.no_grad():
                for n, p in named.items():
                    m = p.numel()
                    p.copy_(original[n] + epsilon * d[i:i + m].reshape(p.shape).to(p))
                    i += m
            increases.append(loss() - base)
            if operator is not None:
                dd = d.to(operator.device, operator.dtype)
                quad.append(0.5 * epsilon ** 2 * float(dd @ operator.matvec(dd)))
    finally:
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(original[n])
    inc = torch.tensor(increases)
    out: dict[str, Any] = {"base_loss": base, "epsilon": epsilon, "increases": inc, "max": float(inc.max()),
                           "mean": float(inc.mean())}
    if quad:
        out["quadratic"] = torch.tensor(quad)
    return out


# -- tasks ----------------------------------------------------------------------------------------------


def task_overlap(f1: Mapping[str, Tensor], f2: Mapping[str, Tensor]) -> dict[str, float]:
    """Similarity of two diagonal Fishers over their common parameters: the Fisher overlap of
    Kirkpatrick et al. 2017, ``1 - 1/2 ||sqrt(F1/Tr F1) - sqrt(F2/Tr F2)||^2`` (1: same, 0: disjoint),
    and the cosine similarity."""
    common = [n for n in f1 if n in f2]
    if not common:
        raise ValueError("the two Fisher estimates share no parameter")
    for n in common:
        if f1[n].shape != f2[n].shape:
            raise ValueError(f"{n}: shapes {tuple(f1[n].shape)} and {tuple(f2[n].shape)} differ")
    a = _flat({n: f1[n] for n in common}).clamp_min(0)
    b = _flat({n: f2[n] for n in common}).clamp_min(0)
    if a.sum() <= 0 or b.sum() <= 0:
        raise ValueError("a Fisher estimate is zero everywhere")
    sa, sb = (a / a.sum()).sqrt(), (b / b.sum()).sqrt()
    return {"overlap": float(1 - 0.5 * ((sa - sb) ** 2).sum()),
            "cosine": float(a @ b / (a.norm() * b.norm())), "n_params": a.numel()}


def fisher_distance(fisher: Mapping[str, Tensor], model_a: nn.Module | Mapping[str, Tensor],
                    model_b: nn.Module | Mapping[str, Tensor]) -> dict[str, Any]:
    """Fisher-weighted squared distance ``sum F (theta_a - theta_b)^2`` (the EWC penalty without 1/2:
    the predicted damage of moving from ``a`` to ``b``), in total and per parameter."""
    pa = dict(model_a.named_parameters()) if isinstance(model_a, nn.Module) else dict(model_a)
    pb = dict(model_b.named_parameters()) if isinstance(model_b, nn.Module) else dict(model_b)
    per = {}
    for n, f in fisher.items():
        if n not in pa or n not in pb:
            raise ValueError(f"parameter {n!r} is missing from one of the models")
        if pa[n].shape != f.shape or pb[n].shape != f.shape:
            raise ValueError(f"{n}: shape mismatch between the Fisher and the models")
        d = (pa[n].detach() - pb[n].detach()).double().to(f.device)
        per[n] = float((f.double() * d * d).sum())
    return {"total": sum(per.values()), "per_parameter": per}


def group_importance(fisher: Mapping[str, Tensor], by: str = "channel", top: int | None = 20, op: str = "sum",
                     **kw: Any) -> list[tuple[str, float]]:
    """Ranked groups (``by`` in parameter | channel | head | layer | group): the most important
    channels / heads / layers first, e.g. to choose what to perturb or prune."""
    if by not in BY:
        raise ValueError(f"by must be one of {BY}")
    return ranked(reduce(fisher, by, op, **kw), top=top)
