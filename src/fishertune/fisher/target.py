"""What ``fishertune fisher compute`` measures: a model and its data, resolved from a path.

Resolution order for ``PATH``:

1. ``loader="module:function"`` given explicitly (``--loader``);
2. a ``.pt`` bundle written with ``torch.save({"model": module, "batches": [...], "likelihood": ...})``;
3. a plugin registered under the entry-point group ``fishertune.fisher_targets`` (first one that
   accepts the path);
4. ``fishertune.recsys.fisher.load_model_and_data`` (recsys run directories and configs), imported
   lazily so that the core never depends on the recommender lab.

A loader function is called as ``fn(path, **options)`` with the options its signature accepts
(``split``, ``overrides``, ``device``) and returns a :class:`FisherTarget`, a mapping with the same
keys, or a tuple ``(model, loader[, likelihood])``.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from torch import nn

RECSYS_HOOK = "fishertune.recsys.fisher:load_model_and_data"
ENTRY_POINT_GROUP = "fishertune.fisher_targets"


@dataclass
class FisherTarget:
    model: nn.Module
    loader: Iterable
    likelihood: Any = "categorical"
    batch_to_inputs: Callable | None = None
    output_transform: Callable | None = None
    name: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def _coerce(obj: Any, source: str) -> FisherTarget:
    if isinstance(obj, FisherTarget):
        return obj
    if isinstance(obj, Mapping):
        known = {k: obj[k] for k in ("model", "loader", "likelihood", "batch_to_inputs", "output_transform",
                                     "name", "meta") if k in obj}
        if "loader" not in known and "batches" in obj:
            known["loader"] = obj["batches"]
        if "model" not in known or "loader" not in known:
            raise ValueError(f"{source}: needs the keys 'model' and 'loader' (or 'batches'), got {sorted(obj)}")
        return FisherTarget(**known)
    if isinstance(obj, (tuple, list)) and len(obj) in (2, 3):
        return FisherTarget(*obj)
    raise TypeError(f"{source}: expected a FisherTarget, a mapping or (model, loader[, likelihood]), "
                    f"got {type(obj).__name__}")


def _import(spec: str) -> Callable:
    if ":" not in spec:
        raise ValueError(f"loader {spec!r} must look like 'package.module:function'")
    mod, fn = spec.split(":", 1)
    try:
        module = importlib.import_module(mod)
    except ModuleNotFoundError as exc:
        raise ValueError(f"cannot import {mod!r} for loader {spec!r}: {exc}") from exc
    if not hasattr(module, fn):
        raise ValueError(f"module {mod!r} has no function {fn!r}")
    return getattr(module, fn)


def _call(fn: Callable, path: str, options: Mapping[str, Any]) -> Any:
    try:
        params = inspect.signature(fn).parameters
        accepts_all = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
        kwargs = {k: v for k, v in options.items() if accepts_all or k in params}
    except (TypeError, ValueError):
        kwargs = {}
    return fn(path, **kwargs)


def resolve_target(path: str, loader: str | None = None, **options: Any) -> FisherTarget:
    """A :class:`FisherTarget` for ``path`` (see the module docstring)."""
    if loader:
        return _coerce(_call(_import(loader), path, options), loader)
    p = Path(path)
    if p.suffix == ".pt" and p.is_file():
        import torch

        return _coerce(torch.load(p, map_location="cpu", weights_only=False), str(p))
    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                found = _call(ep.load(), path, options)
            except (FileNotFoundError, ValueError):
                continue
            if found is not None:
                return _coerce(found, f"entry point {ep.name}")
    except Exception:  # noqa: BLE001 - a broken third-party plugin must not hide the recsys hook
        pass
    if not p.exists():
        raise FileNotFoundError(f"no run directory, config or bundle at {path}")
    try:
        fn = _import(RECSYS_HOOK)
    except ValueError as exc:
        raise ValueError(f"{path}: no loader for it ({exc}); pass --loader module:function or a .pt bundle") from exc
    return _coerce(_call(fn, path, options), RECSYS_HOOK)
