"""Library versions recorded in run folders, manifests and metrics files."""

from __future__ import annotations

import platform

from sparcode_cli import __version__


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
