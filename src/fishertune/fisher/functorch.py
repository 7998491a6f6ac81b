"""The ``torch.func`` path: per-sample gradients of any module by ``vmap(grad(...))``.

Used for every module the per-layer rules do not cover (``nn.MultiheadAttention``, GRU, custom
modules, tied parameters). For a module call with saved inputs ``x`` and output gradients ``go`` (from
the main backward pass), sample ``i``'s gradient is ``d/dtheta <f(theta, x_i), go_i>``: one vmapped
re-forward and backward of that module alone, chunked over the batch to bound memory.

Requirements: the module treats samples independently (dimension 0, or its ``batch_first`` layout
for ``nn.MultiheadAttention``) and is deterministic (no dropout: the engine runs the model in eval
mode by default).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from fishertune.fisher.hooks import Ctx, RuleError, square_sum

_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal")


def _default_dim(leaf: Any, B: int) -> int | None:
    if isinstance(leaf, Tensor) and leaf.dim() > 0 and leaf.shape[0] == B:
        return 0
    return None


def _arg_dim(module: nn.Module, name: str | None, leaf: Any, B: int) -> int | None:
    if isinstance(module, nn.MultiheadAttention) and isinstance(leaf, Tensor):
        if name in ("query", "key", "value"):
            if leaf.dim() != 3:
                raise RuleError("the torch.func path needs batched (3-D) attention inputs")
            return 0 if module.batch_first else 1
        if name == "key_padding_mask":
            return 0
        if name == "attn_mask":
            if leaf.dim() != 2:
                raise RuleError("a 3-D attn_mask (batch * heads) is not supported; pass a 2-D mask "
                                "and key_padding_mask")
            return None
    return _default_dim(leaf, B)


def pack_inputs(module: nn.Module, args: tuple, kwargs: dict, B: int) -> tuple[list, Any, list, list[str]]:
    """Flatten ``(args, kwargs)`` to leaves with the batch dimension of each (None: shared)."""
    keys = list(kwargs)
    flat, spec = tree_flatten((tuple(args), tuple(kwargs.values())))
    dims: list[int | None] = []
    names = [(_MHA_ARGS[i] if i < len(_MHA_ARGS) else None) for i in range(len(args))] + keys
    for name, item in zip(names, (*args, *kwargs.values())):
        dims += [_arg_dim(module, name, leaf, B) for leaf in tree_flatten(item)[0]]
    return flat, spec, dims, keys


def output_dims(module: nn.Module, output: Any, B: int) -> list[int | None]:
    """Batch dimension of each tensor leaf of a module's output."""
    leaves = tree_flatten(output)[0]
    if isinstance(module, nn.MultiheadAttention):
        return [0 if module.batch_first else 1] + [0] * (len(leaves) - 1)
    return [_default_dim(leaf, B) for leaf in leaves]


@contextlib.contextmanager
def _no_mha_fastpath() -> Iterator[None]:
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    old = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(old)


def module_per_sample(module: nn.Module, local_names: list[str], args: tuple, kwargs: dict,
                      out_grads: list[Tensor | None], out_dims: list[int | None], ctx: Ctx,
                      square: bool, autocast: tuple[str, torch.dtype] | None = None) -> dict[str, Tensor]:
    """Per-sample gradients (``square=False``: ``[B, *shape]``) or their squares summed over the batch
    for the named parameters of ``module``, given its saved call and its output gradients."""
    B = ctx.batch_size
    flat, spec, in_dims, keys = pack_inputs(module, args, kwargs, B)
    flat = [t.detach() if isinstance(t, Tensor) else t for t in flat]
    sel = [(i, d, g) for i, (d, g) in enumerate(zip(out_dims, out_grads)) if g is not None]
    if not sel:
        return {}
    for i, d, g in sel:
        if d is None:
            raise RuleError(f"output {i} has shape {tuple(g.shape)} with no sample dimension of size {B}")
    params = dict(module.named_parameters(remove_duplicate=False))
    theta = {n: params[n].detach() for n in local_names}
    go_dims = [d for _, d, _ in sel]
    gos = [g.to(ctx.dtype) for _, _, g in sel]

    def f(theta: dict[str, Tensor], leaves: list, go: list[Tensor]) -> Tensor:
        leaves = [x.unsqueeze(d) if d is not None else x for x, d in zip(leaves, in_dims)]
        a, kw_values = tree_unflatten(leaves, spec)
        out = functional_call(module, theta, tuple(a), dict(zip(keys, kw_values)))
        outs = tree_flatten(out)[0]
        total = torch.zeros((), dtype=ctx.dtype, device=go[0].device)
        for (i, d, _), g in zip(sel, go):
            total = total + (outs[i].squeeze(d).to(g.dtype) * g).sum()
        return total

    fn = vmap(grad(f), in_dims=(None, in_dims, go_dims))
    per_elems = sum(t.numel() for t in theta.values())
    step = max(1, ctx.chunk_elems // max(1, per_elems))
    results: dict[str, list[Tensor]] = {n: [] for n in theta}
    sums: dict[str, Tensor] = {}
    amp = torch.autocast(autocast[0], dtype=autocast[1]) if autocast else contextlib.nullcontext()
    with _no_mha_fastpath(), amp:
        for s in range(0, B, step):
            e = min(B, s + step)
            leaves = [x.narrow(d, s, e - s) if d is not None else x for x, d in zip(flat, in_dims)]
            go = [g.narrow(d, s, e - s) for g, d in zip(gos, go_dims)]
            try:
                res = fn(theta, leaves, go)
            except RuntimeError as exc:
                if "randomness" in str(exc):
                    raise RuleError("it draws random numbers (dropout?) during forward; the torch.func "
                                    "path needs a deterministic module: use the model in eval mode") from exc
                raise RuleError(f"the torch.func path (vmap over grad) failed: {exc}. Modules built on "
                                "fused kernels (nn.GRU/LSTM) are not supported; register a Rule or select "
                                "other parameters") from exc
            for n, g in res.items():
                g = g.to(ctx.dtype)
                if square:
                    sq = square_sum(g)
                    sums[n] = sq if n not in sums else sums[n].add_(sq)
                else:
                    results[n].append(g)
    if square:
        return sums
    return {n: torch.cat(parts) for n, parts in results.items()}


def whole_model_squares(model: nn.Module, params: dict[str, Tensor], inputs: tuple, target: Tensor,
                        nll_fn, chunk: int = 64) -> dict[str, Tensor]:
    """Reference path (also a benchmark anchor): ``vmap(grad)`` of each sample's NLL over the whole
    model; returns ``sum_i g_i**2`` per parameter. ``nll_fn(output, target) -> [B]`` per-sample NLLs."""

    def loss(theta, x, y):
        xs = tuple(t.unsqueeze(0) for t in x)
        out = functional_call(model, theta, xs)
        return nll_fn(out, y.unsqueeze(0)).sum()

    fn = vmap(grad(loss), in_dims=(None, 0, 0))
    theta = {n: p.detach() for n, p in params.items()}
    B = target.shape[0]
    sums: dict[str, Tensor] = {}
    for s in range(0, B, chunk):
        res = fn(theta, tuple(t[s:s + chunk] for t in inputs), target[s:s + chunk])
        for n, g in res.items():
            sq = (g.float() ** 2).sum(0)
            sums[n] = sq if n not in sums else sums[n] + sq
    return sums
