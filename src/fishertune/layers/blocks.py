"""Repeated blocks of a model: found automatically or named by the user, removed by rebuilding.

A :class:`Block` is one entry of a stack of repeated modules, in forward order:

- an entry of an ``nn.Sequential`` of same-type modules (CIFAR ResNet ``layer1.0`` ... ``layer3.8``);
  removing it replaces it by its ``shortcut`` attribute when it has one (option-A down-sampling
  shortcut), else by ``nn.Identity`` (residual block -> identity);
- an entry of an ``nn.ModuleList`` of same-type modules (transformer layers: MiniLM's
  ``bert.encoder.layer.3``); removing it deletes it from the list, which the parent iterates;
- one index of several sibling ``nn.ModuleList`` of equal length iterated in parallel (SASRec's
  ``attn_ln``, ``attn``, ``ffn_ln``, ``ffn``): the block's members are ``attn_ln.i``, ``attn.i``, ...
  and removing it deletes index ``i`` from every list. Members are ordered as registered, which is
  taken as their call order; the block's input is the first member's input and its output the last
  member's output.

:func:`find_blocks` uses a model's own ``blocks()`` method when it has one (``CifarResNet``,
``MiniLM``, or any module whose ``blocks()`` returns ``[(qualified name, module), ...]``), else
searches containers as above, keeping the outermost stacks whose entries have sub-modules (a plain
``Sequential`` of ``Linear`` layers is not a stack of blocks). ``names=`` takes container paths
(``"layer1"``, ``"attn_ln+attn+ffn_ln+ffn"`` for parallel lists) or single block paths.

Removal is done on the model's containers (:func:`remove_blocks`, or temporarily with
:func:`blocks_removed`), so a removed block costs no compute and holds no parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Block:
    """One removable block: ``name`` (its first member's path), ``members`` (the module paths that form
    it; one unless parallel lists), ``containers`` (the parent container path of each member) and
    ``index`` (its position in its containers)."""

    name: str
    members: tuple[str, ...]
    containers: tuple[str, ...]
    index: int


def _get(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError as err:
        raise ValueError(f"{type(model).__name__} has no module {path!r}") from err


def _split(path: str) -> tuple[str, int]:
    parent, _, last = path.rpartition(".")
    if not last.isdigit():
        raise ValueError(f"{path!r} is not an entry of a ModuleList/Sequential (its last part must be an index)")
    return parent, int(last)


def _is_stack(m: nn.Module) -> bool:
    if not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(m) < 2:
        return False
    kids = list(m.children())
    return len({type(k) for k in kids}) == 1


def _has_children(m: nn.Module) -> bool:
    return any(True for _ in m.children())


def _stack_blocks(model: nn.Module, paths: Sequence[str]) -> list[Block]:
    """Blocks of one stack: one container or several parallel ModuleLists of equal length."""
    conts = [_get(model, p) for p in paths]
    for p, c in zip(paths, conts):
        if not isinstance(c, (nn.ModuleList, nn.Sequential)):
            raise ValueError(f"{p!r} is a {type(c).__name__}, not a ModuleList/Sequential of blocks")
    lengths = {len(c) for c in conts}
    if len(lengths) != 1:
        raise ValueError(f"parallel containers {list(paths)} have different lengths {[len(c) for c in conts]}")
    if len(paths) > 1 and any(isinstance(c, nn.Sequential) for c in conts):
        raise ValueError(f"parallel containers {list(paths)} must be ModuleLists (a Sequential runs on its own)")
    n = lengths.pop()
    return [Block(f"{paths[0]}.{i}" if paths[0] else str(i), tuple(f"{p}.{i}" if p else str(i) for p in paths),
                  tuple(paths), i) for i in range(n)]


def find_blocks(model: nn.Module, names: Sequence[str] | str | None = None) -> list[Block]:
    """The model's removable blocks in forward order (see the module docstring)."""
    if isinstance(names, str):
        names = [names]
    if names:
        out: list[Block] = []
        for spec in names:
            paths = [s.strip() for s in spec.split("+")]
            target = _get(model, paths[0])
            if len(paths) == 1 and not isinstance(target, (nn.ModuleList, nn.Sequential)):
                parent, i = _split(paths[0])
                if not isinstance(_get(model, parent), (nn.ModuleList, nn.Sequential)):
                    raise ValueError(f"{paths[0]!r} is not inside a ModuleList/Sequential; blocks must be "
                                     "entries of one")
                out.append(Block(paths[0], (paths[0],), (parent,), i))
            else:
                out.extend(_stack_blocks(model, paths))
        _check_unique(out)
        return out
    own = getattr(model, "blocks", None)
    if callable(own):
        listed = own()
        if not isinstance(listed, (list, tuple)) or not all(isinstance(t, tuple) and len(t) == 2 for t in listed):
            raise ValueError(f"{type(model).__name__}.blocks() must return [(name, module), ...]")
        return find_blocks(model, [name for name, _ in listed])
    return _auto(model)


def _auto(model: nn.Module) -> list[Block]:
    stacks = [(p, m) for p, m in model.named_modules() if _is_stack(m)]
    # group sibling ModuleLists of equal length (parallel lists iterated together)
    groups: list[list[str]] = []
    used: set[str] = set()
    for p, m in stacks:
        if p in used:
            continue
        group = [p]
        if isinstance(m, nn.ModuleList):
            parent = p.rpartition(".")[0]
            for q, k in stacks:
                if q != p and q not in used and isinstance(k, nn.ModuleList) and len(k) == len(m) \
                        and q.rpartition(".")[0] == parent and q.count(".") == p.count("."):
                    group.append(q)
        used.update(group)
        if any(_has_children(c[0]) for c in (list(_get(model, g).children()) for g in group)):
            groups.append(group)
    # keep the outermost stacks: drop a stack that lives inside an entry of another one
    def inside(path: str, other: list[str]) -> bool:
        return any(path.startswith(o + ".") for o in other)

    outer = [g for g in groups if not any(h is not g and inside(g[0], h) for h in groups)]
    if not outer:
        raise ValueError(f"no repeated blocks found in {type(model).__name__}: no ModuleList/Sequential of "
                         "two or more same-type modules with sub-modules; name them with names=[...]")
    out = [b for g in outer for b in _stack_blocks(model, g)]
    _check_unique(out)
    return out


def _check_unique(blocks: list[Block]) -> None:
    seen: set[str] = set()
    for b in blocks:
        for m in b.members:
            if m in seen:
                raise ValueError(f"module {m!r} belongs to two blocks")
            seen.add(m)


def block_parameters(model: nn.Module, block: Block) -> dict[str, nn.Parameter]:
    """``{qualified name: parameter}`` of a block's members."""
    out = {}
    for m in block.members:
        for n, p in _get(model, m).named_parameters():
            out[f"{m}.{n}"] = p
    return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def shortcut(model: nn.Module, block: Block) -> nn.Module:
    """What the block becomes when removed: its ``shortcut`` module if it has one, else identity."""
    sc = getattr(_get(model, block.members[0]), "shortcut", None) if len(block.members) == 1 else None
    return sc if isinstance(sc, nn.Module) else nn.Identity()


def _lookup(blocks: Sequence[Block], names: Sequence[str]) -> list[Block]:
    by_name = {b.name: b for b in blocks}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown blocks {unknown}; the model's blocks are {list(by_name)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a block is named twice in {list(names)}")
    return [by_name[n] for n in names]


def _edits(model: nn.Module, blocks: Sequence[Block], remove: Sequence[str]):
    """``[(container, new children list, old children list)]`` for removing ``remove``."""
    chosen = _lookup(blocks, remove)
    per_container: dict[str, set[int]] = {}
    sc: dict[tuple[str, int], nn.Module] = {}
    for b in chosen:
        for c in b.containers:
            per_container.setdefault(c, set()).add(b.index)
            sc[(c, b.index)] = shortcut(model, b)
    edits = []
    for c, idx in per_container.items():
        cont = _get(model, c)
        old = list(cont)
        if isinstance(cont, nn.Sequential):
            new = [sc[(c, i)] if i in idx else m for i, m in enumerate(old)]
        else:
            new = [m for i, m in enumerate(old) if i not in idx]
        edits.append((cont, new, old))
    return edits


def _set_children(cont: nn.Module, mods: list[nn.Module]) -> None:
    cont._modules.clear()
    for i, m in enumerate(mods):
        cont._modules[str(i)] = m


def remove_blocks(model: nn.Module, blocks: Sequence[Block], remove: Sequence[str]) -> nn.Module:
    """Remove the named blocks from ``model`` in place (see the module docstring); returns ``model``."""
    for cont, new, _ in _edits(model, blocks, remove):
        _set_children(cont, new)
    return model


@contextlib.contextmanager
def blocks_removed(model: nn.Module, blocks: Sequence[Block], remove: Sequence[str]) -> Iterator[nn.Module]:
    """Temporarily remove blocks (for ablation); the original containers are restored on exit."""
    edits = _edits(model, blocks, remove)
    try:
        for cont, new, _ in edits:
            _set_children(cont, new)
        yield model
    finally:
        for cont, _, old in edits:
            _set_children(cont, old)


def first_tensor(obj):
    """The hidden state of a block output / input: the tensor itself or the first element of a tuple."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], torch.Tensor):
        return obj[0]
    raise TypeError(f"cannot find the hidden state in a block output of type {type(obj).__name__}")
