"""Group-level reductions of a diagonal Fisher: per parameter, output channel, attention head,
layer/module, or user-defined groups. Inputs are ``{param name: tensor}`` mappings (a
``FisherResult`` works too); outputs are new mappings, never views of the input.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

OPS: dict[str, Callable[[Tensor], Tensor]] = {
    "sum": lambda t: t.sum(), "mean": lambda t: t.mean(), "max": lambda t: t.max(),
}
BY = ("parameter", "channel", "head", "layer", "group")


def _op(op: str) -> Callable[[Tensor], Tensor]:
    if op not in OPS:
        raise ValueError(f"reduction op must be one of {sorted(OPS)}, got {op!r}")
    return OPS[op]


def per_parameter(fisher: Mapping[str, Tensor], op: str = "sum") -> dict[str, Tensor]:
    """One scalar per parameter tensor."""
    f = _op(op)
    return {n: f(t.double()) for n, t in fisher.items()}


def per_channel(fisher: Mapping[str, Tensor], op: str = "sum", dim: int = 0) -> dict[str, Tensor]:
    """One value per output channel (``dim`` 0: Linear/Conv output units, Embedding rows = items);
    scalars and 1-D tensors (biases, norms) are returned as they are."""
    _op(op)
    out = {}
    for n, t in fisher.items():
        t = t.double()
        if t.dim() <= 1:
            out[n] = t.clone()
            continue
        moved = t.movedim(dim, 0).reshape(t.shape[dim], -1)
        out[n] = {"sum": moved.sum(1), "mean": moved.mean(1), "max": moved.amax(1)}[op]
    return out


def attention_head_layout(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """``{param name: (n_heads, dim, n_blocks)}`` for every ``nn.MultiheadAttention``: the fused
    ``in_proj`` holds q, k, v (3 blocks) along dim 0; ``out_proj.weight`` takes heads along dim 1."""
    layout: dict[str, tuple[int, int, int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            p = name + "." if name else ""
            H = m.num_heads
            if m.in_proj_weight is not None:
                layout[p + "in_proj_weight"] = (H, 0, 3)
            else:
                for k in ("q", "k", "v"):
                    layout[p + f"{k}_proj_weight"] = (H, 0, 1)
            if m.in_proj_bias is not None:
                layout[p + "in_proj_bias"] = (H, 0, 3)
            layout[p + "out_proj.weight"] = (H, 1, 1)
    return layout


def per_head(fisher: Mapping[str, Tensor], layout: Mapping[str, tuple[int, int, int]] | nn.Module,
             op: str = "sum") -> dict[str, Tensor]:
    """Per attention head: for each parameter in ``layout`` (``{name: (n_heads, dim, n_blocks)}``, or a
    model whose ``nn.MultiheadAttention`` modules define it; for separate q/k/v Linear layers give
    ``(heads, 0, 1)``, for the output projection ``(heads, 1, 1)``) a tensor ``[n_blocks, n_heads]``
    (``[n_heads]`` when ``n_blocks`` is 1)."""
    if isinstance(layout, nn.Module):
        layout = attention_head_layout(layout)
    _op(op)
    out = {}
    for name, (H, dim, blocks) in layout.items():
        if name not in fisher:
            continue
        t = fisher[name].double().movedim(dim, 0)
        if t.shape[0] % (H * blocks):
            raise ValueError(f"{name}: dimension {dim} of size {t.shape[0]} is not divisible by "
                             f"{blocks} blocks x {H} heads")
        g = t.reshape(blocks, H, -1)
        r = {"sum": g.sum(-1), "mean": g.mean(-1), "max": g.amax(-1)}[op]
        out[name] = r[0] if blocks == 1 else r
    return out


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else "<root>"


def per_layer(fisher: Mapping[str, Tensor], op: str = "sum", depth: int | None = None) -> dict[str, Tensor]:
    """One value per module (the parameter's owner, or its ancestor ``depth`` levels below the root)."""
    f = _op(op)
    groups: dict[str, list[Tensor]] = defaultdict(list)
    for n, t in fisher.items():
        key = _module_of(n)
        if depth is not None and key != "<root>":
            key = ".".join(key.split(".")[:depth])
        groups[key].append(t.double().reshape(-1))
    return {k: f(torch.cat(v)) for k, v in groups.items()}


GroupSpec = Mapping[str, Sequence[str] | str] | Callable[[str], str | None]


def per_group(fisher: Mapping[str, Tensor], groups: GroupSpec, op: str = "sum",
              strict: bool = False) -> dict[str, Tensor]:
    """User-defined groups: ``{group: [regex, ...]}`` (full match; first group that matches wins) or a
    function ``name -> group | None``. ``strict`` makes an unmatched parameter an error."""
    f = _op(op)
    if callable(groups):
        assign = groups
    else:
        pats = [(g, [re.compile(p) for p in ([ps] if isinstance(ps, str) else ps)]) for g, ps in groups.items()]

        def assign(name: str) -> str | None:
            for g, ps in pats:
                if any(p.fullmatch(name) for p in ps):
                    return g
            return None

    parts: dict[str, list[Tensor]] = defaultdict(list)
    for n, t in fisher.items():
        g = assign(n)
        if g is None:
            if strict:
                raise ValueError(f"parameter {n!r} matches no group")
            continue
        parts[g].append(t.double().reshape(-1))
    return {g: f(torch.cat(v)) for g, v in parts.items()}


def reduce(fisher: Mapping[str, Tensor], by: str = "layer", op: str = "sum", *, groups: GroupSpec | None = None,
           layout: Mapping[str, tuple[int, int, int]] | nn.Module | None = None,
           depth: int | None = None) -> dict[str, Tensor]:
    """Dispatch on ``by`` in ``parameter | channel | head | layer | group``."""
    if by == "parameter":
        return per_parameter(fisher, op)
    if by == "channel":
        return per_channel(fisher, op)
    if by == "head":
        if layout is None:
            raise ValueError("by='head' needs layout= (a model with nn.MultiheadAttention, or a dict)")
        return per_head(fisher, layout, op)
    if by == "layer":
        return per_layer(fisher, op, depth)
    if by == "group":
        if groups is None:
            raise ValueError("by='group' needs groups=")
        return per_group(fisher, groups, op)
    raise ValueError(f"by must be one of {BY}, got {by!r}")


def ranked(values: Mapping[str, Tensor], top: int | None = None, descending: bool = True) -> list[tuple[str, float]]:
    """Scalars (or flattened entries, named ``name[i]``) sorted by value: a ranked importance list."""
    items: list[tuple[str, float]] = []
    for n, t in values.items():
        t = t.detach().double().reshape(-1).cpu()
        if t.numel() == 1:
            items.append((n, float(t)))
        else:
            items += [(f"{n}[{i}]", float(v)) for i, v in enumerate(t.tolist())]
    items.sort(key=lambda kv: kv[1], reverse=descending)
    return items[:top] if top is not None else items
