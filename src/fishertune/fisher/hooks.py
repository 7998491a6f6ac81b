"""Per-layer rules: squared per-sample gradients from a layer's saved input and its output gradient.

For a layer called once per forward, ``squares`` returns ``sum_i g_i**2`` for each parameter, where
``g_i`` is sample ``i``'s gradient, computed in the cheapest exact way (for a 2-D ``nn.Linear`` that
is one matmul of squares, ``(go**2)^T (a**2)``; for an embedding it touches only the looked-up rows).
For a layer called several times per forward the squares of per-call gradients would miss the cross
terms, so ``per_sample`` returns the per-sample gradients themselves (dense ``[B, *shape]`` or, for
embeddings, uncoalesced sparse rows) which the engine sums over calls before squaring.

Sample structure: dimension 0 of every input is the sample index. With ``token_level`` every
position (every row once the feature dimensions are removed) is a sample of its own; only
position-wise layers (Linear, Embedding, LayerNorm, RMSNorm) support that mode.

Contributions are returned in the accumulation dtype (float32, or float64 for float64 models), so
fp16/bf16 activations are squared in full precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F


@dataclass
class Ctx:
    """What a rule needs to know about the batch."""

    batch_size: int
    token_level: bool
    dtype: torch.dtype
    chunk_elems: int = 1 << 24  # bound on materialised per-sample gradient elements


@dataclass
class SparseRows:
    """Rows ``values[k]`` added to row ``index[k]`` of a parameter's first dimension."""

    index: Tensor
    values: Tensor


@dataclass
class SparseSamples:
    """Uncoalesced per-sample gradient rows: ``values[k]`` belongs to sample ``sample[k]``, row ``index[k]``."""

    sample: Tensor
    index: Tensor
    values: Tensor
    n_rows: int


TOTAL = "__total__"  # optional key of squares(): the sum of all returned entries, computed cheaply


class RuleError(ValueError):
    """A layer's input does not have the structure the rule needs (the engine adds the module name)."""


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _batch_first(t: Tensor, ctx: Ctx, what: str = "input") -> None:
    if t.dim() == 0 or t.shape[0] != ctx.batch_size:
        raise RuleError(f"its {what} has shape {tuple(t.shape)} but the batch has {ctx.batch_size} samples; "
                        "per-sample rules need the sample dimension first (token_level=True treats every "
                        "row as a sample)")


def chunked_square_sum(make: Callable[[int, int], Tensor], n: int, per_sample_elems: int, ctx: Ctx) -> Tensor:
    """``sum_i make(i)**2`` over ``n`` samples, materialising at most ``ctx.chunk_elems`` elements."""
    step = max(1, ctx.chunk_elems // max(1, per_sample_elems))
    total: Tensor | None = None
    for start in range(0, n, step):
        g = make(start, min(n, start + step))
        sq = square_sum(g)
        total = sq if total is None else total.add_(sq)
    assert total is not None
    return total


def square_sum(g: Tensor) -> Tensor:
    """``sum_i g[i]**2`` (squaring in place when ``g`` is a temporary nobody else holds)."""
    if g._base is None and g.is_contiguous() and not g.requires_grad:
        return g.square_().sum(0)
    return g.square().sum(0)


class Rule:
    """Base class of per-layer rules."""

    kind = "rule"
    positional = False  # valid in token-level mode
    patches_forward = False  # computes through its own forward (see attention.py) instead of hooks
    multi_call_ok = True  # per_sample() supports modules called several times per forward
    checks_lead = True  # dimension 0 of the first input must be the sample dimension

    def unsupported(self, module: nn.Module) -> str | None:
        """A reason why this module instance cannot use the rule, or None."""
        return None

    def params(self, module: nn.Module) -> list[str]:
        """Parameter names (relative to the module) the rule can compute."""
        return [n for n, _ in module.named_parameters(recurse=False)]

    def save(self, module: nn.Module, args: tuple, kwargs: dict) -> Tensor:
        if not args or not isinstance(args[0], Tensor):
            raise RuleError("its first positional argument is not a tensor")
        return args[0].detach()

    def squares(self, module: nn.Module, x: Tensor, go: Tensor, names: set[str], ctx: Ctx) -> dict[str, Any]:
        raise NotImplementedError

    def per_sample(self, module: nn.Module, x: Tensor, go: Tensor, names: set[str], ctx: Ctx) -> dict[str, Any]:
        raise NotImplementedError


class LinearRule(Rule):
    kind = "linear"
    positional = True

    def _split(self, x: Tensor, go: Tensor, ctx: Ctx) -> tuple[Tensor, Tensor, bool]:
        a, g = _as(x, ctx.dtype), _as(go, ctx.dtype)
        if ctx.token_level:
            return a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1]), True
        _batch_first(a, ctx)
        if a.dim() == 2:
            return a, g, True
        return a.reshape(a.shape[0], -1, a.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1]), False

    def squares(self, module, x, go, names, ctx):
        a, g, flat = self._split(x, go, ctx)
        out: dict[str, Any] = {}
        if flat:  # one row per sample: (g_o a_j)^2 summed over rows is a matmul of squares
            g2 = g * g
            a2 = a * a if "weight" in names else None
            if "weight" in names:
                out["weight"] = g2.t() @ a2
            if "bias" in names:
                out["bias"] = g2.sum(0)
            if not g.is_cuda:  # on the CPU a pass over the weight costs more than these reductions
                gs = g2.sum(1)
                total = gs @ a2.sum(1) if a2 is not None else gs.new_zeros(())
                out[TOTAL] = total + gs.sum() if "bias" in names else total
            return out
        if "weight" in names:
            O, I = g.shape[-1], a.shape[-1]
            out["weight"] = chunked_square_sum(
                lambda s, e: torch.bmm(g[s:e].transpose(1, 2), a[s:e]), a.shape[0], O * I, ctx)
        if "bias" in names:
            gb = g.sum(1)
            out["bias"] = (gb * gb).sum(0)
        return out

    def per_sample(self, module, x, go, names, ctx):
        a, g, flat = self._split(x, go, ctx)
        if flat:
            a, g = a.unsqueeze(1), g.unsqueeze(1)
        out: dict[str, Any] = {}
        if "weight" in names:
            out["weight"] = torch.bmm(g.transpose(1, 2), a)
        if "bias" in names:
            out["bias"] = g.sum(1)
        return out


class EmbeddingRule(Rule):
    kind = "embedding"
    positional = True

    def unsupported(self, module):
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq couples the samples of a batch"
        return None

    def _rows(self, module, idx: Tensor, go: Tensor, ctx: Ctx) -> tuple[Tensor, Tensor, Tensor]:
        D = go.shape[-1]
        flat_idx = idx.reshape(-1)
        g = _as(go.reshape(-1, D), ctx.dtype)
        per = 1 if ctx.token_level else None
        if not ctx.token_level:
            _batch_first(idx, ctx)
            per = flat_idx.numel() // max(1, ctx.batch_size)
        sample = torch.arange(flat_idx.numel() // per, device=idx.device).repeat_interleave(per)
        if module.padding_idx is not None:
            keep = flat_idx != module.padding_idx
            flat_idx, g, sample = flat_idx[keep], g[keep], sample[keep]
        return sample, flat_idx, g

    def squares(self, module, x, go, names, ctx):
        if "weight" not in names:
            return {}
        sample, idx, g = self._rows(module, x, go, ctx)
        if ctx.token_level or x.numel() == ctx.batch_size:  # one lookup per sample: rows are samples
            return {"weight": SparseRows(idx, g * g)}
        return {"weight": _coalesce_square(sample, idx, g, module.num_embeddings)}

    def per_sample(self, module, x, go, names, ctx):
        if "weight" not in names:
            return {}
        sample, idx, g = self._rows(module, x, go, ctx)
        return {"weight": SparseSamples(sample, idx, g, module.num_embeddings)}


def _coalesce_square(sample: Tensor, idx: Tensor, rows: Tensor, n_rows: int) -> SparseRows:
    """Sum the rows of each (sample, index) pair, square them: the per-sample squared gradient rows."""
    keys = sample * n_rows + idx
    uniq, inverse = torch.unique(keys, return_inverse=True)
    summed = torch.zeros(uniq.numel(), *rows.shape[1:], dtype=rows.dtype, device=rows.device)
    summed.index_add_(0, inverse, rows)
    return SparseRows(uniq % n_rows, summed * summed)


def finish_sparse_samples(parts: list[SparseSamples]) -> SparseRows:
    """Per-sample rows from several calls -> squared rows (coalesced over calls and duplicates)."""
    return _coalesce_square(torch.cat([p.sample for p in parts]), torch.cat([p.index for p in parts]),
                            torch.cat([p.values for p in parts]), parts[0].n_rows)


class ConvRule(Rule):
    """Conv1d / Conv2d: the per-sample weight gradients of a whole chunk of samples come from one
    grouped convolution weight-gradient (samples folded into the channel groups), never from an
    unfolded patch matrix; then squared and summed."""

    kind = "conv"

    def unsupported(self, module):
        if isinstance(module.padding, str) and module.padding not in ("same", "valid"):
            return f"padding={module.padding!r}"
        return None

    def _padded(self, module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """The input padded as the module pads it, and the padding left for the convolution."""
        k, dil = tuple(module.kernel_size), tuple(module.dilation)
        if module.padding_mode != "zeros":
            return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), (0,) * len(k)
        if module.padding == "valid":
            return x, (0,) * len(k)
        if module.padding == "same":
            pads: list[int] = []
            for kk, dd in reversed(list(zip(k, dil))):
                total = dd * (kk - 1)
                pads += [total // 2, total - total // 2]
            return F.pad(x, pads), (0,) * len(k)
        return x, tuple(module.padding)

    def _check(self, module, x: Tensor, ctx: Ctx) -> None:
        if ctx.token_level:
            raise RuleError("convolutions are not position-wise; token_level=True is not supported")
        want = 3 if isinstance(module, nn.Conv1d) else 4
        if x.dim() != want:
            raise RuleError(f"expected a batched {want}-D input, got shape {tuple(x.shape)}")
        _batch_first(x, ctx)

    def _per_sample_weight(self, module, x: Tensor, go: Tensor) -> Tensor:
        """Per-sample weight gradients ``[b, *weight.shape]`` of a chunk of ``b`` samples."""
        b = x.shape[0]
        w = module.weight
        xs = x.reshape(1, b * x.shape[1], *x.shape[2:])
        gs = go.reshape(1, b * go.shape[1], *go.shape[2:])
        fn = torch.nn.grad.conv1d_weight if isinstance(module, nn.Conv1d) else torch.nn.grad.conv2d_weight
        x_pad, pad = self._padded(module, xs)
        gw = fn(x_pad, (b * w.shape[0], *w.shape[1:]), gs, stride=module.stride, padding=pad,
                dilation=module.dilation, groups=b * module.groups)
        return gw.reshape(b, *w.shape)

    def squares(self, module, x, go, names, ctx):
        self._check(module, x, ctx)
        x, g = _as(x, ctx.dtype), _as(go, ctx.dtype)
        out: dict[str, Any] = {}
        if "weight" in names:
            per = math.prod(module.weight.shape)
            out["weight"] = chunked_square_sum(lambda s, e: self._per_sample_weight(module, x[s:e], g[s:e]),
                                               x.shape[0], per, ctx)
        if "bias" in names:
            gb = g.flatten(2).sum(-1)
            out["bias"] = (gb * gb).sum(0)
        return out

    def per_sample(self, module, x, go, names, ctx):
        self._check(module, x, ctx)
        x, g = _as(x, ctx.dtype), _as(go, ctx.dtype)
        out: dict[str, Any] = {}
        if "weight" in names:
            out["weight"] = self._per_sample_weight(module, x, g)
        if "bias" in names:
            out["bias"] = g.flatten(2).sum(-1)
        return out


class _AffineNormRule(Rule):
    """Shared part of LayerNorm / RMSNorm / BatchNorm: per-sample grads of weight = sum go * x_hat."""

    def _normalised(self, module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _per_sample_parts(self, module, x, go, names, ctx) -> dict[str, Tensor]:
        xh = self._normalised(module, _as(x, ctx.dtype))
        g = _as(go, ctx.dtype)
        out = {}
        if "weight" in names:
            out["weight"] = self._reduce(module, g * xh, ctx)
        if "bias" in names:
            out["bias"] = self._reduce(module, g, ctx)
        return out

    def squares(self, module, x, go, names, ctx):
        return {k: (v * v).sum(0) for k, v in self._per_sample_parts(module, x, go, names, ctx).items()}

    def per_sample(self, module, x, go, names, ctx):
        return self._per_sample_parts(module, x, go, names, ctx)


class LayerNormRule(_AffineNormRule):
    kind = "layernorm"
    positional = True

    def _dims(self, module) -> tuple[int, ...]:
        k = len(module.normalized_shape)
        return tuple(range(-k, 0))

    def _normalised(self, module, x):
        dims = self._dims(module)
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + module.eps)

    def _reduce(self, module, t: Tensor, ctx: Ctx) -> Tensor:
        shape = tuple(module.normalized_shape)
        if ctx.token_level:
            return t.reshape(-1, *shape)
        _batch_first(t, ctx)
        return t.reshape(t.shape[0], -1, *shape).sum(1)


class RMSNormRule(LayerNormRule):
    kind = "rmsnorm"

    def _normalised(self, module, x):
        dims = self._dims(module)
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        return x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)


class BatchNormRule(_AffineNormRule):
    """BatchNorm affine parameters. Exact in eval mode (running statistics are constants). In train
    mode the batch statistics couple the samples: the rule then treats them as constants, which is
    an approximation (the engine reports a warning)."""

    kind = "batchnorm"

    def uses_batch_stats(self, module) -> bool:
        return module.training or module.running_mean is None

    def _normalised(self, module, x):
        if x.dim() < 2:
            raise RuleError(f"expected a batched input [B, C, ...], got shape {tuple(x.shape)}")
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.uses_batch_stats(module):
            dims = (0,) + tuple(range(2, x.dim()))
            mean = x.mean(dims, keepdim=True)
            var = x.var(dims, unbiased=False, keepdim=True)
        else:
            mean = module.running_mean.to(x.dtype).reshape(shape)
            var = module.running_var.to(x.dtype).reshape(shape)
        return (x - mean) * torch.rsqrt(var + module.eps)

    def _reduce(self, module, t, ctx):
        if ctx.token_level:
            raise RuleError("batch norm is not position-wise; token_level=True is not supported")
        _batch_first(t, ctx)
        return t.reshape(t.shape[0], t.shape[1], -1).sum(-1)


RULES: list[tuple[type, Rule]] = [
    (nn.Linear, LinearRule()),
    (nn.Embedding, EmbeddingRule()),
    (nn.Conv1d, ConvRule()),
    (nn.Conv2d, ConvRule()),
    (nn.LayerNorm, LayerNormRule()),
    (nn.modules.batchnorm._BatchNorm, BatchNormRule()),
]
if hasattr(nn, "RMSNorm"):
    RULES.append((nn.RMSNorm, RMSNormRule()))


from fishertune.fisher.attention import AttentionRule  # noqa: E402 (attention.py imports this module)

RULES.append((nn.MultiheadAttention, AttentionRule()))


def register_rule(module_type: type, rule: Rule) -> None:
    """Add (or override, first match wins) a rule for a module type."""
    RULES.insert(0, (module_type, rule))


def find_rule(module: nn.Module) -> Rule | None:
    for cls, rule in RULES:
        if type(module) is cls or (isinstance(module, cls) and type(module).forward is cls.forward):
            return rule
    return None
