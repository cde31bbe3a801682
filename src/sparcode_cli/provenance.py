"""What a number depends on, recorded with it: library versions, the code digest and the git commit.

A cached artifact (processed data, a finished run, an evaluated cell) is reused only when the digest of the
code that made it equals the current one, so a cache made by older code is never mistaken for a current one.

- `code_digest()`: sha256 of every module of the package that can change a number (all of them except the
  ones that only format cached numbers: PRESENTATION_ONLY) and of the versions of the numeric libraries. A changed comment changes it too: that costs a retrain, never a wrong reuse.
- `preprocess_digest()`: the same for the modules that turn raw files into a processed folder (part of the
  processed folder's key, so a change there re-preprocesses instead of reading an older output).
- `git_commit()`: the commit of the checkout (with "-dirty" when tracked files differ), or None outside git.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import subprocess
from collections.abc import Iterable

from sparcode_cli import __version__
from sparcode_cli.paths import PACKAGE_DIR

# Modules that only render numbers already cached (reports, plots, the progress display): editing them must
# not invalidate trained runs.
PRESENTATION_ONLY = ("reproduce/report.py", "reproduce/plots.py", "reproduce/progress.py")
# The modules whose output is a processed folder (with the registry they read formats from).
PREPROCESS_MODULES = ("data/preprocess.py", "data/parsers.py", "data/registry.py")
NUMERIC_LIBRARIES = ("torch", "numpy", "scipy", "faiss", "polars", "numba")


def versions() -> dict[str, str]:
    import faiss
    import numpy as np
    import polars as pl
    import scipy
    import torch

    return {
        "sparcode": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "faiss": getattr(faiss, "__version__", "unknown"),
        "polars": pl.__version__,
    }


def _library_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    dist = {"faiss": "faiss-cpu"}.get(name, name)
    try:
        return version(dist)
    except PackageNotFoundError:
        return "absent"


def _digest(files: Iterable[str], libraries: Iterable[str]) -> str:
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0" + (PACKAGE_DIR / rel).read_bytes() + b"\0")
    for lib in sorted(libraries):
        h.update(f"{lib}=={_library_version(lib)}\0".encode())
    h.update(f"python {platform.python_version_tuple()[:2]}".encode())
    return h.hexdigest()[:16]


@functools.cache
def code_digest() -> str:
    """16 hex digits naming the code (and numeric libraries) that runs, indexes and cells depend on."""
    files = [p.relative_to(PACKAGE_DIR).as_posix() for p in PACKAGE_DIR.rglob("*.py")]
    return _digest([f for f in files if f not in PRESENTATION_ONLY], NUMERIC_LIBRARIES)


@functools.cache
def preprocess_digest() -> str:
    """16 hex digits naming the preprocessing code (and polars): part of every processed folder's key."""
    return _digest(PREPROCESS_MODULES, ("polars",))


def git_commit(short: bool = True) -> str | None:
    """The checkout's commit ("abc1234", "abc1234-dirty" when tracked files changed), None outside git."""
    root = PACKAGE_DIR.parent.parent

    def git(*args: str) -> subprocess.CompletedProcess[str] | None:
        try:
            return subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None

    head = git("rev-parse", *(["--short"] if short else []), "HEAD")
    if head is None or head.returncode != 0 or not head.stdout.strip():
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    dirty = status is not None and status.returncode == 0 and bool(status.stdout.strip())
    return head.stdout.strip() + ("-dirty" if dirty else "")
