"""Diagonal Fisher estimators: empirical, Monte-Carlo ("true") and exact, over a data loader.

``F = (1/N) sum_i E_y[g_i(y)**2]`` with ``g_i(y) = d/dtheta -log p(y | x_i, theta)``:

- ``kind="empirical"``: ``y`` is the observed target (one backward pass per batch);
- ``kind="true"``: ``n_samples`` targets drawn from the model's predictive distribution (softmax at
  ``temperature``), one backward pass each, averaged;
- ``kind="exact"``: the expectation in closed form through a square-root factor of the output Fisher
  (one backward pass per column: classes for a categorical, output units for Gaussian/Bernoulli); this
  equals the diagonal of the generalised Gauss-Newton matrix.

Per-sample gradients come from layer hooks (see :mod:`fishertune.fisher.hooks`); modules without a rule
use ``torch.func`` (reported in ``FisherResult.paths``). ``N`` counts samples (or valid tokens with
``token_level=True``), so the estimate does not depend on the batch size.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from fishertune.fisher.engine import HookManager
from fishertune.fisher.likelihoods import Likelihood, get_likelihood
from fishertune.fisher.plan import Plan, build_plan, trace_uses
from fishertune.utils.progress import track

KINDS = ("empirical", "true", "exact")


class NonFiniteError(FloatingPointError):
    """A batch produced NaN/inf losses or squared gradients and ``on_nonfinite='raise'``."""


@dataclass
class FisherResult:
    """Diagonal Fisher per parameter (same shapes as the parameters) and how it was computed."""

    fisher: dict[str, Tensor]
    n_samples: int
    n_batches: int
    skipped_batches: int = 0
    kind: str = "empirical"
    likelihood: str = "categorical"
    normalized: bool = True
    token_level: bool = False
    paths: dict[str, list[str]] = field(default_factory=dict)
    param_paths: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> Tensor:
        return self.fisher[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.fisher)

    def __len__(self) -> int:
        return len(self.fisher)

    def items(self):
        return self.fisher.items()

    def keys(self):
        return self.fisher.keys()

    def values(self):
        return self.fisher.values()

    def trace(self) -> float:
        return float(sum(t.double().sum() for t in self.fisher.values()))

    def meta(self) -> dict[str, Any]:
        """JSON-able description (stored with the tensors by FisherStore)."""
        return {"n_samples": self.n_samples, "n_batches": self.n_batches, "skipped_batches": self.skipped_batches,
                "kind": self.kind, "likelihood": self.likelihood, "normalized": self.normalized,
                "token_level": self.token_level, "paths": self.paths}


ParamSpec = Sequence[str] | Callable[[str, nn.Parameter], bool] | None


def select_parameters(model: nn.Module, params: ParamSpec = None,
                      modules: Sequence[str | type] | None = None) -> dict[str, nn.Parameter]:
    """Trainable parameters to compute: all (None), names or regular expressions (full match), a
    predicate ``(name, param) -> bool``; ``modules`` restricts to parameters of the named modules (or
    module types) and their children."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not named:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (requires_grad=True)")
    if modules is not None:
        keep: set[str] = set()
        for mname, m in model.named_modules():
            if any((isinstance(s, str) and (mname == s)) or (isinstance(s, type) and isinstance(m, s))
                   for s in modules):
                prefix = mname + "." if mname else ""
                keep |= {prefix + n for n, _ in m.named_parameters()}
        named = {n: p for n, p in named.items() if n in keep}
        if not named:
            raise ValueError(f"no trainable parameter belongs to modules {list(modules)}")
    if params is None:
        return named
    if callable(params):
        out = {n: p for n, p in named.items() if params(n, p)}
    else:
        if isinstance(params, str):
            params = [params]
        pats = [re.compile(s) for s in params]
        out = {n: p for n, p in named.items() if any(pat.fullmatch(n) for pat in pats)}
        missing = [s for s, pat in zip(params, pats) if not any(pat.fullmatch(n) for n in named)]
        if missing:
            raise ValueError(f"no trainable parameter matches {missing}; names are e.g. {list(named)[:8]}")
    if not out:
        raise ValueError("the parameter selection is empty")
    return out


def default_batch(batch: Any) -> tuple[tuple, Tensor]:
    """``(inputs, target)`` from a batch: a pair ``(x, y)`` where ``x`` is a tensor or a tuple of
    positional inputs. Pass ``batch_to_inputs`` for anything else."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
        return (tuple(x) if isinstance(x, (tuple, list)) else (x,)), y
    raise TypeError(f"cannot split a batch of type {type(batch).__name__} into (inputs, target); "
                    "pass batch_to_inputs=lambda batch: ((model_args...), target)")


def _to(obj: Any, device: torch.device | None) -> Any:
    if device is None:
        return obj
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@contextlib.contextmanager
def _frozen(model: nn.Module, train_mode: bool):
    """Freeze parameters (only activation gradients are needed) and set eval/train mode; restore."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.train(train_mode)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        for m, t in modes:
            m.training = t


def diagonal_fisher(model: nn.Module, loader: Iterable, likelihood: str | Likelihood | Callable = "categorical",
                    kind: str = "empirical", n_samples: int = 1, temperature: float = 1.0,
                    params: ParamSpec = None, modules: Sequence[str | type] | None = None,
                    token_level: bool = False, normalize: bool = True, on_nonfinite: str = "skip",
                    fallback: bool = True, device: str | torch.device | None = None,
                    batch_to_inputs: Callable[[Any], tuple[tuple, Tensor]] | None = None,
                    output_transform: Callable[[Any], Tensor] | None = None,
                    max_batches: int | None = None, train_mode: bool = False,
                    autocast_dtype: torch.dtype | None = None, generator: torch.Generator | None = None,
                    max_exact_columns: int = 256, chunk_elems: int | None = None,
                    micro_batch: int | str | None = "auto",
                    distributed: bool | None = None, progress: bool = True) -> FisherResult:
    """Diagonal Fisher information of ``model`` over ``loader`` (see the module docstring).

    ``on_nonfinite``: ``"skip"`` drops a batch with NaN/inf (counted in ``skipped_batches``) or
    ``"raise"``. ``fallback=False`` makes modules without a rule an error instead of using torch.func.
    ``distributed``: all-reduce sums and counts over ``torch.distributed`` ranks (default: when
    initialised). ``output_transform`` picks the likelihood's input from the model output (e.g. the
    logits of a VAE's ``(logits, mu, logvar)``). The model runs in eval mode unless ``train_mode``.
    ``micro_batch``: split each batch into pieces of this many samples (exact: the Fisher is a sum over
    samples). ``"auto"`` (default) splits only on the CPU and only when a batch's output is large (more
    than ``CPU_OUTPUT_BUDGET`` elements, e.g. a softmax over 20k items at 50 positions): there, a batch's
    logits fall out of the caches and micro-batches run 1.5-2x faster; ``None`` never splits.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if on_nonfinite not in ("skip", "raise"):
        raise ValueError(f"on_nonfinite must be 'skip' or 'raise', got {on_nonfinite!r}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not (micro_batch is None or micro_batch == "auto" or (isinstance(micro_batch, int) and micro_batch >= 1)):
        raise ValueError(f"micro_batch must be a positive int, 'auto' or None, got {micro_batch!r}")
    lik = get_likelihood(likelihood)
    selected = select_parameters(model, params, modules)
    split = batch_to_inputs or default_batch
    if device is None:
        device = next(iter(selected.values())).device
    device = torch.device(device)
    acc = {n: torch.zeros(p.shape, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32,
                          device=p.device) for n, p in selected.items()}
    plan: Plan | None = None
    manager: HookManager | None = None
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())

    def forward(inputs: tuple) -> Tensor:
        with amp:
            out = model(*inputs)
        out = output_transform(out) if output_transform is not None else out
        if not isinstance(out, Tensor):
            raise TypeError(f"the model returned {type(out).__name__}; pass output_transform to pick the "
                            "tensor the likelihood scores (e.g. output_transform=lambda out: out[0])")
        if out.dim() > 0 and out.shape[0] > 0:
            state["out_per_sample"] = out.numel() // out.shape[0]
        return out

    if chunk_elems is None:
        chunk_elems = 1 << 27 if device.type == "cuda" else 1 << 24
    state = {"count": 0, "n_batches": 0, "skipped": 0, "seen": 0, "out_per_sample": 0, "counted": -1}
    pieces: int | None = micro_batch if isinstance(micro_batch, int) else None
    pending: list[tuple] = []

    def resolve() -> None:
        """Commit (or skip) the pending batch. Its finiteness flag is read one batch late, so that
        on CUDA the host never waits for work it has just queued."""
        if not pending:
            return
        dense, sparse, finite, batch_count, index = pending.pop()
        if not bool(finite):
            if on_nonfinite == "raise":
                raise NonFiniteError(f"batch {index}: non-finite loss or squared gradient")
            state["skipped"] += 1
            return
        same = [n for n, t in dense.items() if t.device == acc[n].device and t.dtype == acc[n].dtype]
        if same:  # one fused multi-tensor add
            torch._foreach_add_([acc[n] for n in same], [dense[n] for n in same])
        for name, t in dense.items():
            if name not in same:
                acc[name].add_(t.to(acc[name].device, acc[name].dtype))
        for name, parts in sparse.items():
            for idx, vals in parts:
                acc[name].index_add_(0, idx.to(acc[name].device), vals.to(acc[name].device, acc[name].dtype))
        state["count"] += int(batch_count)
        if index != state["counted"]:  # micro-batches of one batch count once
            state["n_batches"] += 1
            state["counted"] = index

    try:
        with _frozen(model, train_mode):
            iterator = track(loader, "fisher") if progress else iter(loader)
            for batch in iterator:
                if max_batches is not None and state["seen"] >= max_batches:
                    break
                inputs, target = split(batch)
                inputs, target = _to(tuple(inputs), device), _to(target, device)
                if target.dim() > 0 and target.shape[0] == 0:  # an empty batch adds nothing
                    state["seen"] += 1
                    continue
                if plan is None:
                    plan, manager = _make_plan(model, selected, inputs, target.shape[0], forward, fallback,
                                               token_level, chunk_elems)
                    if micro_batch == "auto" and device.type == "cpu" and state["out_per_sample"]:
                        pieces = max(1, CPU_OUTPUT_BUDGET // state["out_per_sample"])
                assert manager is not None
                for part_inputs, part_target in _micro_batches(inputs, target, pieces):
                    manager.set_batch(part_target.shape[0], token_level)
                    manager.active = True
                    try:
                        batch_count = _one_batch(manager, lik, forward, part_inputs, part_target, kind, n_samples,
                                                 temperature, token_level, generator, max_exact_columns)
                    finally:
                        manager.active = False
                        manager.end_batch()
                    dense, sparse, finite = manager.take()
                    resolve()  # the previous (micro-)batch
                    pending.append((dense, sparse, finite, batch_count, state["seen"]))
                state["seen"] += 1
            resolve()
    finally:
        if manager is not None:
            manager.remove()
    count, n_batches, skipped = state["count"], state["n_batches"], state["skipped"]
    if _use_distributed(distributed):  # every rank joins, also one whose shard was empty
        from fishertune.fisher.distributed import all_reduce_sums

        count, n_batches, skipped = all_reduce_sums(acc, [count, n_batches, skipped])
    elif plan is None:
        raise ValueError("the loader yielded no batches (or only empty ones)")
    if count == 0:
        raise ValueError(f"no usable samples: {n_batches + skipped} batch(es), {skipped} skipped for "
                         "non-finite values")
    if skipped:
        warnings.warn(f"diagonal_fisher: skipped {skipped} batch(es) with NaN/inf", RuntimeWarning, stacklevel=2)
    plan_warnings = list(plan.warnings) if plan is not None else []
    for w in plan_warnings:
        warnings.warn(w, RuntimeWarning, stacklevel=2)
    if normalize:
        for t in acc.values():
            t.div_(count)
    return FisherResult(acc, count, n_batches, skipped, kind, lik.name, normalize, token_level,
                        plan.paths() if plan else {}, plan.param_paths() if plan else {}, plan_warnings)


CPU_OUTPUT_BUDGET = 1 << 22
"""Output elements per micro-batch that ``micro_batch="auto"`` aims for on the CPU (16 MB of fp32, half a typical L3 cache)."""


def _micro_batches(inputs: tuple, target: Tensor, size: int | None) -> Iterator[tuple[tuple, Tensor]]:
    """Split a batch along dim 0 into pieces of ``size`` samples; whole when every tensor input does not
    lead with the batch size (the model may mix batched and unbatched inputs) or no split is asked."""
    n = target.shape[0] if target.dim() > 0 else 0
    batched = all(not isinstance(t, Tensor) or (t.dim() > 0 and t.shape[0] == n) for t in inputs)
    if size is None or size >= n or not batched:
        yield inputs, target
        return
    for i in range(0, n, size):
        yield tuple(t[i:i + size] if isinstance(t, Tensor) else t for t in inputs), target[i:i + size]


def _use_distributed(flag: bool | None) -> bool:
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    if flag is None:
        return initialised
    if flag and not initialised:
        raise RuntimeError("distributed=True but torch.distributed is not initialised")
    return flag


def _make_plan(model, selected, inputs, batch_size, forward, fallback, token_level,
               chunk_elems: int) -> tuple[Plan, HookManager]:
    flags = {n: p.requires_grad for n, p in selected.items()}
    for p in selected.values():  # the trace sees uses through results that require grad
        p.requires_grad_(True)
    try:
        trace = _trace(model, selected, inputs, batch_size, forward)
    finally:
        for n, p in selected.items():
            p.requires_grad_(flags[n])
    plan = build_plan(model, selected, trace, batch_size, fallback=fallback, token_level=token_level)
    if not plan.handlers:
        raise ValueError("none of the selected parameters influences the model output")
    manager = HookManager(plan, {n: p.dtype for n, p in selected.items()}, chunk_elems)
    manager.install()
    return plan, manager


def _trace(model, selected, inputs, batch_size, forward):
    """Trace on the first two samples when the inputs allow it (cheaper), else on the whole batch.
    Leading sizes seen on the slice are mapped back to the batch size."""
    small = min(batch_size, 2)
    if small < batch_size and all(not isinstance(t, Tensor) or (t.dim() > 0 and t.shape[0] == batch_size)
                                  for t in inputs):
        try:
            trace = trace_uses(model, selected, lambda: forward(tuple(
                t[:small] if isinstance(t, Tensor) else t for t in inputs)))
        except Exception:  # noqa: BLE001 - models that need the full batch: trace it below
            trace = None
        if trace is not None:
            trace.lead = {k: {batch_size if n == small else -n for n in v} for k, v in trace.lead.items()}
            return trace
    return trace_uses(model, selected, lambda: forward(inputs))


def _one_batch(manager: HookManager, lik: Likelihood, forward, inputs, target, kind, n_samples, temperature,
               token_level, generator, max_exact_columns) -> int | Tensor:
    """Forward once and run the kind's backward passes; returns the batch's sample count. Nothing here
    waits for the device: the losses' sum joins the batch's finiteness check."""
    out = forward(inputs)
    losses, count = lik.nll(out, target, token_level)
    manager.totals.append(losses.detach().sum())
    if not out.requires_grad:
        raise ValueError("the model output does not depend on any selected parameter")
    if kind == "empirical":
        manager.scale = 1.0
        losses.sum().backward()
        manager.end_pass()
        return count
    if kind == "true":
        manager.scale = 1.0 / n_samples
        for s in range(n_samples):
            drawn = lik.sample(out, target, temperature, generator)
            nll, _ = lik.nll(out, drawn, token_level)
            nll.sum().backward(retain_graph=s < n_samples - 1)
            manager.end_pass()
        return count
    n_cols = lik.n_columns(out, token_level)
    if n_cols > max_exact_columns:
        raise ValueError(f"kind='exact' needs {n_cols} backward passes for this output "
                         f"(shape {tuple(out.shape)}), above max_exact_columns={max_exact_columns}; "
                         "use kind='true' (Monte-Carlo) or raise max_exact_columns")
    manager.scale = 1.0
    cols = list(lik.sqrt_factor(out, target, token_level, temperature))
    for k, col in enumerate(cols):
        out.backward(col.to(out.dtype), retain_graph=k < len(cols) - 1)
        manager.end_pass()
    return count
