"""Save only what a fine-tune changed, plus its strategy, as one safetensors file; reload it onto the base.

:func:`save_delta` compares the fine-tuned ``state_dict`` (parameters and buffers, e.g. BatchNorm
running statistics after ``bn_adapt``) with the base one and stores every tensor that differs, plus
the ``always`` tensors in full (the parameters the strategy trains, so a new task head is always in the
file, whatever the base's initialisation). A tensor with fewer than half its entries changed (a FISH
mask) is stored sparsely as flat indices + values. The JSON metadata holds the strategy config, the
stored names and shapes, and a fingerprint of the base tensors that the delta does not replace in full, so :func:`load_delta` refuses a base
the delta was not made from (``check_base=False`` skips this).

The result is identical outputs: ``load_delta(path, base)`` makes ``base`` equal to the fine-tuned
model bit for bit in every stored tensor, and untouched tensors were equal already.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fishertune.utils.io import atomic_write

FORMAT = "fishertune-delta/1"


def base_fingerprint(state: Mapping[str, Tensor]) -> str:
    """sha256 over names, shapes, dtypes and bytes of a state dict (sorted by name)."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{tuple(v.shape)}|{v.dtype}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def _bytes(t: Tensor) -> Tensor:
    """Flat byte view, one row per entry (bit-wise comparison, NaN-safe)."""
    flat = t.detach().cpu().reshape(-1).contiguous()
    return flat.view(torch.uint8).view(flat.numel(), -1)


def diff_state(base: Mapping[str, Tensor], tuned: Mapping[str, Tensor],
               always: set[str] | None = None) -> dict[str, Tensor]:
    """Names whose tensors differ bit-wise, or that are in ``always``, with the tuned values."""
    missing = sorted(set(tuned) ^ set(base))
    if missing:
        raise ValueError(f"base and fine-tuned models differ in tensors: {missing[:8]}")
    out = {}
    for k, v in tuned.items():
        b = base[k]
        if tuple(v.shape) != tuple(b.shape):
            raise ValueError(f"{k}: shape {tuple(v.shape)} in the fine-tuned model, {tuple(b.shape)} in the base")
        same = v.dtype == b.dtype and torch.equal(_bytes(v), _bytes(b))
        if not same or (always and k in always):
            out[k] = v.detach().cpu().clone()
    return out


def save_delta(path: str | os.PathLike, model: nn.Module, base_state: Mapping[str, Tensor],
               strategy: Any = None, *, always: list[str] | None = None,
               meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write what ``model`` changed relative to ``base_state``, plus the ``always`` tensors in full
    (the trained parameters, e.g. a new head), and the strategy config to ``path`` (atomically).
    Returns the metadata (``stored``, ``sparse``, counts)."""
    from safetensors.torch import save_file

    always_set = set(always or [])
    unknown = sorted(always_set - set(base_state))
    if unknown:
        raise ValueError(f"always names tensors the model does not have: {unknown[:8]}")
    changed = diff_state(base_state, model.state_dict(), always_set)
    tensors: dict[str, Tensor] = {}
    sparse: list[str] = []
    for k, v in changed.items():
        if k not in always_set and v.dtype == base_state[k].dtype and v.numel() >= 16:
            diff = (_bytes(v) != _bytes(base_state[k])).any(1)
            if int(diff.sum()) * 2 < v.numel():
                idx = torch.nonzero(diff).squeeze(1)
                tensors[f"{k}::index"] = idx.to(torch.int64).contiguous()
                tensors[f"{k}::values"] = v.reshape(-1)[idx].contiguous()
                sparse.append(k)
                continue
        tensors[k] = v.contiguous()
    dense = set(changed) - set(sparse)
    strat_json = strategy.model_dump(mode="json") if hasattr(strategy, "model_dump") else strategy
    info = {
        "format": FORMAT,
        "strategy": strat_json,
        "stored": sorted(changed),
        "sparse": sorted(sparse),
        "shapes": {k: list(base_state[k].shape) for k in changed},
        "base_fingerprint": base_fingerprint({k: v for k, v in base_state.items() if k not in dense}),
        "stored_entries": int(sum(t.numel() for n, t in tensors.items() if not n.endswith("::index"))),
        "meta": dict(meta or {}),
    }
    metadata = {"fishertune": json.dumps(info, sort_keys=True, default=str)}
    atomic_write(Path(path), lambda p: save_file(tensors, str(p), metadata=metadata))
    return info


def read_delta(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The stored tensors (sparse ones still split) and the metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"delta file {p} not found")
    with safe_open(str(p), framework="pt") as fh:
        raw = (fh.metadata() or {}).get("fishertune")
    if raw is None:
        raise ValueError(f"{p} is not a fishertune delta (no 'fishertune' metadata)")
    info = json.loads(raw)
    if info.get("format") != FORMAT:
        raise ValueError(f"{p}: unsupported delta format {info.get('format')!r} (want {FORMAT})")
    return load_file(str(p)), info


def load_delta(path: str | os.PathLike, model: nn.Module, *, check_base: bool = True) -> dict[str, Any]:
    """Apply a delta onto ``model`` (the base it was made from) in place; returns the metadata, whose
    ``strategy`` entry is the strategy config (``get_strategy(info['strategy'])`` rebuilds it)."""
    tensors, info = read_delta(path)
    state = model.state_dict()
    if check_base:
        dense = set(info["stored"]) - set(info["sparse"])
        got = base_fingerprint({k: v for k, v in state.items() if k not in dense})
        if got != info["base_fingerprint"]:
            raise ValueError(f"{path}: made from another base model (fingerprint {info['base_fingerprint'][:12]}"
                             f", this model {got[:12]}); pass check_base=False to force")
    missing = [k for k in info["stored"] if k not in state]
    if missing:
        raise ValueError(f"{path}: the model has no tensors {missing[:8]}")
    with torch.no_grad():
        for k in info["stored"]:
            target = state[k]
            if list(target.shape) != info["shapes"][k]:
                raise ValueError(f"{path}: {k} has shape {info['shapes'][k]}, the model {list(target.shape)}")
            if k in info["sparse"]:
                idx = tensors[f"{k}::index"].to(target.device)
                vals = tensors[f"{k}::values"].to(target.device, target.dtype)
                target.view(-1).index_copy_(0, idx, vals)
            else:
                target.copy_(tensors[k].to(target.device, target.dtype))
    return info
