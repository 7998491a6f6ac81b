"""Compression plans: which blocks to drop for a target ratio, applied by rebuilding the model, saved as
JSON + safetensors, reloaded without pickles, and measured (metric kept, parameters and memory saved,
real latency speed-up).

A target ``ratio`` is met by the fewest removed blocks that reach it:

- ``by="blocks"``: ``kept <= N / ratio`` (6 blocks: 1.35x -> 2 removed, 1.8x -> 3, 2.5x -> 4);
- ``by="params"``: total parameters after removal ``<= total / ratio``; each method's candidates are
  tried with 1, 2, ... blocks removed (for ``angular`` every contiguous run of that length, best first).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fishertune.layers.analysers import Importance
from fishertune.layers.blocks import Block, block_parameters, count_parameters, find_blocks, model_bytes, remove_blocks
from fishertune.utils.io import atomic_dir

PLAN_FILE = "plan.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "fishertune.layers.plan/1"


def blocks_to_remove(n: int, ratio: float) -> int:
    """How many of ``n`` blocks a block-count ratio removes: ``n - floor(n / ratio)``."""
    return n - math.floor(n / ratio + 1e-9)


@dataclass
class CompressionPlan:
    """Blocks to remove (``remove``, in model order) out of ``blocks``; ``target`` records how they were
    chosen (method, count or ratio), ``spec`` names the dense model for reloading."""

    remove: list[str]
    blocks: list[str]
    method: str = ""
    target: dict[str, Any] = field(default_factory=dict)
    spec: str = ""
    block_spec: list[str] | None = None

    def __post_init__(self) -> None:
        unknown = [b for b in self.remove if b not in self.blocks]
        if unknown:
            raise ValueError(f"plan removes unknown blocks {unknown}; blocks are {self.blocks}")
        if len(set(self.remove)) != len(self.remove):
            raise ValueError(f"plan names a block twice: {self.remove}")
        pos = {b: i for i, b in enumerate(self.blocks)}
        self.remove = sorted(self.remove, key=pos.__getitem__)

    # -- choosing --------------------------------------------------------------------------------------

    @classmethod
    def from_importance(cls, importance: Importance, model: nn.Module, *, count: int | None = None,
                        ratio: float | None = None, by: str = "blocks", blocks: Sequence[Block] | None = None,
                        spec: str = "", block_spec: Sequence[str] | None = None) -> "CompressionPlan":
        """Choose blocks with ``importance`` for ``count`` removed blocks or a target ``ratio`` (see the
        module docstring). ``model`` (dense) sizes the blocks for ``by="params"``."""
        if (count is None) == (ratio is None):
            raise ValueError("give exactly one of count= and ratio=")
        blocks = list(blocks) if blocks is not None else find_blocks(model, block_spec)
        names = [b.name for b in blocks]
        if names != importance.blocks:
            raise ValueError(f"the importance scores are for blocks {importance.blocks[:4]}..., the model has "
                             f"{names[:4]}...")
        n = len(names)
        if count is not None:
            chosen = importance.choose(int(count))
            target: dict[str, Any] = {"count": int(count)}
        else:
            if by not in ("blocks", "params"):
                raise ValueError(f"by must be 'blocks' or 'params', got {by!r}")
            if not ratio >= 1.0:
                raise ValueError(f"ratio must be >= 1, got {ratio}")
            target = {"ratio": float(ratio), "by": by}
            if by == "blocks":
                k = blocks_to_remove(n, ratio)
                chosen = importance.choose(k)
            else:
                total = count_parameters(model)
                size = {b.name: sum(p.numel() for p in block_parameters(model, b).values()) for b in blocks}
                limit = total / ratio

                def ok(cand: list[str]) -> bool:
                    return total - sum(size[c] for c in cand) <= limit + 1e-9

                chosen = None
                for k in range(0, n + 1):
                    chosen = importance.choose(k, ok)
                    if chosen is not None:
                        break
                if chosen is None:
                    most = total / max(total - sum(size.values()), 1)
                    raise ValueError(f"a parameter ratio of {ratio} is out of reach: removing every block gives "
                                     f"{most:.2f}x ({total - sum(size.values()):,} parameters outside the blocks)")
        return cls(list(chosen), names, importance.method, target, spec, list(block_spec) if block_spec else None)

    # -- applying --------------------------------------------------------------------------------------

    def apply(self, model: nn.Module, *, inplace: bool = False) -> nn.Module:
        """The model rebuilt without the plan's blocks (a deep copy unless ``inplace``)."""
        blocks = find_blocks(model, self.block_spec)
        names = [b.name for b in blocks]
        if names != self.blocks:
            raise ValueError(f"the plan was made for blocks {self.blocks[:4]}... ({len(self.blocks)}), this model has "
                             f"{names[:4]}... ({len(names)})")
        out = model if inplace else copy.deepcopy(model)
        return remove_blocks(out, blocks, self.remove)  # blocks are paths: they name the copy's modules too

    # -- files -----------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CompressionPlan":
        if data.get("format") != FORMAT:
            raise ValueError(f"not a compression plan (format {data.get('format')!r}, want {FORMAT!r})")
        keys = {"remove", "blocks", "method", "target", "spec", "block_spec"}
        extra = set(data) - keys - {"format"}
        if extra:
            raise ValueError(f"unknown keys in the plan: {sorted(extra)}")
        return cls(**{k: data[k] for k in keys if k in data})

    def save(self, directory: str | os.PathLike, compressed: nn.Module | None = None, *,
             overwrite: bool = False) -> Path:
        """Write ``plan.json`` and, with ``compressed``, its weights as ``model.safetensors`` into a new
        directory (built atomically); an existing one is an error unless ``overwrite``."""
        import shutil

        from safetensors.torch import save_file

        if Path(directory).exists():
            if not overwrite:
                raise FileExistsError(f"{directory} exists; pass overwrite=True (CLI: --overwrite) to replace it")
            shutil.rmtree(directory)

        with atomic_dir(directory) as tmp:
            (Path(tmp) / PLAN_FILE).write_text(json.dumps(self.to_json(), indent=2))
            if compressed is not None:
                state = {k: v.detach().contiguous().cpu() for k, v in compressed.state_dict().items()}
                _dedupe(state)
                save_file(state, str(Path(tmp) / WEIGHTS_FILE), metadata={"plan": json.dumps(self.to_json())})
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "CompressionPlan":
        p = Path(directory) / PLAN_FILE
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found (a plan directory holds {PLAN_FILE})")
        return cls.from_json(json.loads(p.read_text()))


def _dedupe(state: dict[str, torch.Tensor]) -> None:
    """safetensors refuses tensors sharing memory (tied weights): store copies."""
    seen: dict[int, str] = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            state[k] = v.clone()
        else:
            seen[ptr] = k


def load_compressed(directory: str | os.PathLike, build: Callable[[], nn.Module]) -> tuple[nn.Module, CompressionPlan]:
    """Rebuild a compressed model from ``directory``: ``build()`` (the dense architecture), the plan's
    removals, then the saved weights with ``strict=True``; no pickle is read."""
    from safetensors.torch import load_file

    plan = CompressionPlan.load(directory)
    w = Path(directory) / WEIGHTS_FILE
    if not w.is_file():
        raise FileNotFoundError(f"{w} not found: save the plan with its compressed model")
    model = plan.apply(build(), inplace=True)
    try:
        model.load_state_dict(load_file(str(w)), strict=True)
    except RuntimeError as err:
        raise ValueError(f"{w} does not fit the model rebuilt from {directory / Path(PLAN_FILE)}: {err}") from err
    return model.eval(), plan


# -- measuring ---------------------------------------------------------------------------------------


def measure(dense: nn.Module, compressed: nn.Module, *, metric: Callable[[nn.Module], float] | None = None,
            dense_metric: float | None = None, latency_inputs: tuple | None = None, repeats: int = 20,
            warmup: int = 3, threads: int | None = 1, latency_device: str | torch.device | None = None
            ) -> dict[str, float]:
    """Metric kept (compressed / dense), parameters and bytes saved, latency speed-up (if inputs given).

    ``latency_device`` times copies of both models on that device (e.g. ``"cpu"`` for a CPU speed-up of
    models evaluated on a GPU); default: where the models are."""
    from fishertune.layers.latency import speedup

    out: dict[str, float] = {}
    pd, pc = count_parameters(dense), count_parameters(compressed)
    bd, bc = model_bytes(dense), model_bytes(compressed)
    out.update({"params": pc, "params_dense": pd, "params_ratio": pd / max(pc, 1),
                "params_saved": 1 - pc / max(pd, 1), "bytes": bc, "bytes_saved": 1 - bc / max(bd, 1)})
    if metric is not None:
        d = float(metric(dense)) if dense_metric is None else float(dense_metric)
        c = float(metric(compressed))
        out.update({"metric_dense": d, "metric": c, "kept": c / d if d else float("nan")})
    if latency_inputs is not None:
        a, b, inputs = dense, compressed, latency_inputs
        if latency_device is not None:
            dev = torch.device(latency_device)
            a, b = copy.deepcopy(dense).to(dev), copy.deepcopy(compressed).to(dev)
            inputs = tuple(t.to(dev) if isinstance(t, torch.Tensor) else t for t in latency_inputs)
        else:
            dev = next((p.device for p in dense.parameters()), torch.device("cpu"))
            inputs = tuple(t.to(dev) if isinstance(t, torch.Tensor) else t for t in latency_inputs)
        out.update(speedup(a, b, inputs, repeats=repeats, warmup=warmup, threads=threads))
        out["latency_device"] = str(next((p.device for p in a.parameters()), "cpu"))
    return out
