"""Where things live: one setting each, read from the environment.

- ``FISHERTUNE_DATA``: the data root that dataset names resolve under (default
  ``~/.cache/fishertune/datasets``; missing datasets are downloaded there).
- ``FISHERTUNE_CACHE``: processed-data cache (default ``~/.cache/fishertune/processed``).
"""

from __future__ import annotations

import os
from pathlib import Path


def data_root() -> Path:
    return Path(os.environ.get("FISHERTUNE_DATA", Path.home() / ".cache" / "fishertune" / "datasets")).expanduser()


def cache_root() -> Path:
    return Path(os.environ.get("FISHERTUNE_CACHE", Path.home() / ".cache" / "fishertune" / "processed")).expanduser()
