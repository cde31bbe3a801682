"""Where things live on disk: the cache (SPARCODE_HOME) and the files shipped inside the package."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
EMBEDDED_DIR = PACKAGE_DIR / "embedded"
REGISTRY_FILE = PACKAGE_DIR / "datasets.toml"


def sparcode_home() -> Path:
    """Cache root: $SPARCODE_HOME, else ~/.cache/sparcode."""
    env = os.environ.get("SPARCODE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparcode"


def raw_dir(dataset: str) -> Path:
    """Verified raw files of one dataset."""
    return sparcode_home() / "raw" / dataset


def downloads_dir() -> Path:
    """Archives and partial downloads."""
    return sparcode_home() / "downloads"


def processed_root() -> Path:
    """Preprocessed datasets, one folder per (dataset, data hash)."""
    return sparcode_home() / "processed"
