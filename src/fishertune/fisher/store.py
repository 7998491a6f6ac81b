"""FisherStore: named Fisher estimates (tasks), one-shot or EMA-updated, kept where memory allows.

Storage modes:
- ``"cpu"``: float32 on the CPU (default);
- ``"cuda"`` (or any device string such as ``"cuda:1"``): float32 on that device;
- ``"cpu-fp16"``: float16 on the CPU with a power-of-two scale per tensor (the largest value maps to at
  most 2**15), so values keep a relative error <= 2**-11 down to ``max * 2**-28`` and an absolute error
  <= ``scale * 2**-25`` below that; half the memory of float32.

``get(task, device)`` converts lazily on first access and caches the float32 copy on that device
until the task changes. EMA updates ``m <- decay m + (1 - decay) F`` are bias-corrected on read,
``m / (1 - decay**steps)``, so early reads are unbiased (Adam-style).

Files are safetensors (tensors ``"{task}::{param}"``) with JSON metadata: version, tasks (meta, EMA
state, storage scales) and the model signature (parameter names and shapes). Loading checks the
signature against a model and names every mismatch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from fishertune.utils.io import atomic_write, json_default

FORMAT = "fishertune.fisher.store/1"
SEP = "::"


class FisherSignatureError(ValueError):
    """A stored Fisher does not fit a model (names or shapes differ)."""


def model_signature(model: nn.Module | Mapping[str, Tensor]) -> dict[str, list[int]]:
    """``{parameter name: shape}`` of a model (all parameters) or of a mapping of tensors."""
    items = model.named_parameters() if isinstance(model, nn.Module) else model.items()
    return {n: list(t.shape) for n, t in items}


def signature_mismatch(stored: Mapping[str, list[int]], actual: Mapping[str, list[int]], limit: int = 6) -> list[str]:
    """Human-readable differences (empty when ``stored`` fits ``actual``)."""
    problems = []
    missing = [n for n in stored if n not in actual]
    extra = [n for n in actual if n not in stored]
    shapes = [n for n in stored if n in actual and list(stored[n]) != list(actual[n])]
    if missing:
        problems.append(f"{len(missing)} stored name(s) not in the model, e.g. {missing[:limit]}")
    if extra:
        problems.append(f"{len(extra)} model parameter(s) not in the store, e.g. {extra[:limit]}")
    for n in shapes[:limit]:
        problems.append(f"{n}: stored shape {list(stored[n])}, model shape {list(actual[n])}")
    if len(shapes) > limit:
        problems.append(f"... and {len(shapes) - limit} more shape mismatch(es)")
    return problems


def _encode_fp16(t: Tensor) -> tuple[Tensor, float]:
    t = t.detach().float()
    m = float(t.abs().max()) if t.numel() else 0.0
    if not math.isfinite(m):
        raise ValueError("cannot store non-finite Fisher values")
    scale = 2.0 ** (math.ceil(math.log2(m)) - 15) if m > 0 else 1.0
    return (t / scale).to(torch.float16).cpu(), scale


@dataclass
class _Task:
    values: dict[str, Tensor]
    scales: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    decay: float | None = None  # EMA decay, None for one-shot
    steps: int = 0


class FisherStore:
    """Named Fisher estimates; see the module docstring."""

    def __init__(self, storage: str = "cpu"):
        if storage != "cpu-fp16":
            torch.device(storage)  # validates the device string
        self.storage = storage
        self._tasks: dict[str, _Task] = {}
        self._cache: dict[tuple[str, str], dict[str, Tensor]] = {}
        self.signature: dict[str, list[int]] | None = None

    # -- writing -----------------------------------------------------------------------------------
    def _encode(self, values: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, float]]:
        stored, scales = {}, {}
        for n, t in values.items():
            if not torch.isfinite(t).all():
                raise ValueError(f"refusing to store non-finite Fisher values for {n!r}")
            if self.storage == "cpu-fp16":
                stored[n], scales[n] = _encode_fp16(t)
            else:
                stored[n] = t.detach().to(device=self.storage, dtype=torch.float32).clone()
        return stored, scales

    def _decode(self, task: _Task, name: str, device: torch.device | str | None = None) -> Tensor:
        t = task.values[name].to(device or task.values[name].device, dtype=torch.float32)
        if name in task.scales:
            t = t * task.scales[name]
        return t

    @staticmethod
    def _check_name(task: str) -> None:
        if not task or SEP in task:
            raise ValueError(f"task names must be non-empty and must not contain {SEP!r}: {task!r}")

    def put(self, task: str, fisher: Mapping[str, Tensor], meta: Mapping[str, Any] | None = None) -> None:
        """Store a one-shot estimate (replaces the task). A FisherResult's description is kept."""
        self._check_name(task)
        values, scales = self._encode(dict(fisher.items()))
        m = dict(fisher.meta()) if hasattr(fisher, "meta") else {}
        m.update(meta or {})
        self._tasks[task] = _Task(values, scales, m)
        self._invalidate(task)

    def update(self, task: str, fisher: Mapping[str, Tensor], decay: float = 0.9,
               meta: Mapping[str, Any] | None = None) -> None:
        """EMA update of a task (created on first use); reads are bias-corrected."""
        self._check_name(task)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        new = dict(fisher.items())
        cur = self._tasks.get(task)
        if cur is None:
            zeros = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in new.items()}
            values, scales = self._encode(zeros)
            cur = self._tasks[task] = _Task(values, scales, {}, decay, 0)
        elif cur.decay is None:
            raise ValueError(f"task {task!r} holds a one-shot estimate; use put() or another task name")
        elif cur.decay != decay:
            raise ValueError(f"task {task!r} uses decay {cur.decay}, got {decay}")
        if set(new) != set(cur.values):
            raise ValueError(f"task {task!r}: the update has different parameters than the stored EMA")
        mixed = {}
        for n, t in new.items():
            old = self._decode(cur, n, t.device)
            mixed[n] = old.mul_(decay).add_(t.detach().float(), alpha=1 - decay)
        cur.values, cur.scales = self._encode(mixed)
        cur.steps += 1
        cur.meta.update(meta or {})
        self._invalidate(task)

    def remove(self, task: str) -> None:
        self._task(task)
        del self._tasks[task]
        self._invalidate(task)

    def _invalidate(self, task: str) -> None:
        for key in [k for k in self._cache if k[0] == task]:
            del self._cache[key]

    # -- reading -----------------------------------------------------------------------------------
    def _task(self, task: str) -> _Task:
        if task not in self._tasks:
            raise KeyError(f"no Fisher task {task!r}; stored tasks: {sorted(self._tasks)}")
        return self._tasks[task]

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def __contains__(self, task: str) -> bool:
        return task in self._tasks

    def meta(self, task: str) -> dict[str, Any]:
        t = self._task(task)
        return {**t.meta, "ema_decay": t.decay, "ema_steps": t.steps}

    def get(self, task: str, device: str | torch.device | None = None, cache: bool = True) -> dict[str, Tensor]:
        """Float32 tensors on ``device`` (default: where they are stored, CPU for fp16), bias-corrected
        for EMA tasks. Converted lazily and cached per device unless ``cache=False``."""
        t = self._task(task)
        dev = torch.device(device) if device is not None else torch.device("cpu" if self.storage == "cpu-fp16"
                                                                              else self.storage)
        key = (task, str(dev))
        if cache and key in self._cache:
            return self._cache[key]
        corr = 1.0
        if t.decay is not None:
            if t.steps == 0:
                raise ValueError(f"task {task!r} has no EMA updates yet")
            corr = 1.0 / (1.0 - t.decay ** t.steps)
        out = {n: self._decode(t, n, dev) * corr if corr != 1.0 else self._decode(t, n, dev) for n in t.values}
        if cache:
            self._cache[key] = out
        return out

    def memory_report(self) -> dict[str, Any]:
        """Bytes per task (stored form), of the caches per device, and in total."""
        def nbytes(d: Mapping[str, Tensor]) -> int:
            return sum(v.numel() * v.element_size() for v in d.values())

        tasks = {name: {"bytes": nbytes(t.values), "n_values": sum(v.numel() for v in t.values.values()),
                        "storage": self.storage, "kind": "ema" if t.decay is not None else "one-shot"}
                 for name, t in self._tasks.items()}
        caches: dict[str, int] = {}
        for (_task, dev), d in self._cache.items():
            caches[dev] = caches.get(dev, 0) + nbytes(d)
        stored = sum(v["bytes"] for v in tasks.values())
        return {"tasks": tasks, "cache_bytes": caches, "stored_bytes": stored,
                "total_bytes": stored + sum(caches.values())}

    # -- files -------------------------------------------------------------------------------------
    def check(self, model: nn.Module | Mapping[str, Tensor], source: str = "store") -> None:
        """Raise FisherSignatureError when the stored tasks do not fit ``model``."""
        actual = model_signature(model)
        problems: list[str] = []
        if self.signature is not None:
            problems = signature_mismatch(self.signature, actual)
        for task, t in self._tasks.items():
            shapes = {n: list(v.shape) for n, v in t.values.items()}
            bad = [n for n in shapes if n not in actual or shapes[n] != actual[n]]
            if bad:
                problems += [f"task {task!r}: " + p for p in signature_mismatch(
                    shapes, {n: actual[n] for n in shapes if n in actual})]
        if problems:
            raise FisherSignatureError(f"{source} was written for another model:\n  " + "\n  ".join(problems))

    def save(self, path: str | Path, model: nn.Module | None = None) -> Path:
        """Write every task to a safetensors file (atomically), with the model signature."""
        from safetensors.torch import save_file

        if model is not None:
            self.signature = model_signature(model)
        tensors: dict[str, Tensor] = {}
        for task, t in self._tasks.items():
            for n, v in t.values.items():
                tensors[f"{task}{SEP}{n}"] = v.detach().cpu().contiguous()
        header = {"format": FORMAT, "storage": self.storage, "signature": self.signature,
                  "tasks": {task: {"meta": t.meta, "decay": t.decay, "steps": t.steps, "scales": t.scales,
                                   "names": list(t.values)} for task, t in self._tasks.items()}}
        metadata = {"fishertune": json.dumps(header, default=json_default)}
        return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None, storage: str | None = None) -> "FisherStore":
        """Read a file written by :meth:`save`; with ``model``, check that it fits."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Fisher file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as fh:
                raw = (fh.metadata() or {}).get("fishertune")
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:  # safetensors raises its own error types
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
        if raw is None:
            raise ValueError(f"{path}: no fishertune metadata (not written by FisherStore.save)")
        header = json.loads(raw)
        if header.get("format") != FORMAT:
            raise ValueError(f"{path}: unsupported format {header.get('format')!r} (expected {FORMAT})")
        saved_storage = header.get("storage", "cpu")
        store = cls(storage or ("cpu" if saved_storage not in ("cpu", "cpu-fp16") else saved_storage))
        store.signature = header.get("signature")
        for task, info in header["tasks"].items():
            src = _Task({n: tensors[f"{task}{SEP}{n}"] for n in info["names"]}, dict(info.get("scales", {})),
                        info.get("meta", {}), info.get("decay"), int(info.get("steps", 0)))
            raw_values = {n: store._decode(src, n, "cpu") for n in src.values}
            values, scales = store._encode(raw_values)
            store._tasks[task] = _Task(values, scales, src.meta, src.decay, src.steps)
        if model is not None:
            store.check(model, source=str(path))
        return store
