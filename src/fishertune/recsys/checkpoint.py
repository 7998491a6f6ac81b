"""Checkpoints that load with ``torch.load(path, weights_only=True)``.

A checkpoint is a plain dict of tensors, dicts, lists, str, int, float, bool and None: model and
optimiser state, the resolved config, the data hash, the epoch, the RNG states (torch, CUDA, NumPy's
global generator, Python's ``random``) and the training history. It is written atomically (a temporary
file in the same folder, then a rename), so an interrupted save never leaves a broken checkpoint.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fishertune.utils.io import atomic_write

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "get_rng_state", "set_rng_state",
           "FORMAT_VERSION"]

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here (other data, unreadable, wrong format)."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` (plus ``format_version``) with ``torch.save``."""
    state = {"format_version": FORMAT_VERSION, **state}
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path, data_hash: str | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``).

    ``data_hash``: the hash of the data this run uses now; a checkpoint made on other data is refused
    with an error naming both hashes (``None`` skips the check).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(f"{path}: cannot load checkpoint: {exc}") from exc
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path}: not a fishertune checkpoint (no 'format_version')")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {state['format_version']} is newer than this "
                              f"fishertune understands ({FORMAT_VERSION})")
    if data_hash is not None and state.get("data_hash") != data_hash:
        raise CheckpointError(f"{path}: checkpoint was made on data with hash {state.get('data_hash')!r}, "
                              f"but the current data has hash {data_hash!r}; use a new run directory or "
                              "the data the run started with")
    return state


def get_rng_state() -> dict[str, Any]:
    """Every RNG stream a training run draws from, as tensors / plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].cpu().numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu().to(torch.uint8) for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
