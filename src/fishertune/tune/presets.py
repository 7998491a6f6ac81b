"""FisherTune presets (``configs/fishertune/presets.yaml``): name -> overrides of
:class:`~fishertune.tune.fishertune.FisherTuneConfig` keys, optionally ``train.*`` keys for the runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fishertune.config import ConfigError, read_yaml, validate
from fishertune.tune.fishertune import FisherTuneConfig

__all__ = ["load_presets", "preset_config", "PRESETS_PATH"]

PRESETS_PATH = Path(__file__).resolve().parents[3] / "configs" / "fishertune" / "presets.yaml"


def load_presets(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """All presets as ``{name: {key: value}}`` (``train.*`` keys kept as a nested ``train`` mapping)."""
    p = Path(path) if path is not None else PRESETS_PATH
    data = read_yaml(p)
    out: dict[str, dict[str, Any]] = {}
    for name, body in data.items():
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(f"{p}: preset {name!r} must be a mapping of FisherTune keys, got {type(body).__name__}")
        out[str(name)] = dict(body)
    return out


def preset_config(name: str, path: str | Path | None = None, **overrides: Any) -> FisherTuneConfig:
    """The validated FisherTuneConfig of one preset (its ``train`` keys dropped), with ``overrides``."""
    presets = load_presets(path)
    if name not in presets:
        raise ConfigError(f"unknown FisherTune preset {name!r}; presets are {sorted(presets)}")
    body = {k: v for k, v in presets[name].items() if k != "train"}
    body.update(overrides)
    return validate(FisherTuneConfig, body, source=f"preset {name!r}")
