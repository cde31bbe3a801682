"""numba's thread pool, shared by the compiled kernels (models/fused_table.py, retrieval/sparse_index.py)."""

from __future__ import annotations

import sys

import numba

# numba's default "omp" threading layer shares torch's libgomp and, on its first parallel launch, sets the
# OpenMP thread count of the calling thread to NUMBA_NUM_THREADS: torch then ran 2 threads where it was set to
# 1, and two 1-thread training workers spun 4 OpenMP threads on 2 cores (5x slower). numba's own pool does not
# touch OpenMP; set on import, before any kernel runs.
numba.config.THREADING_LAYER = "workqueue"


def sync_numba_threads() -> int:
    """Give numba torch's intra-op thread count when torch is loaded (what training, evaluation and
    `faiss_index.threads` set); returns the count numba now uses."""
    torch = sys.modules.get("torch")
    if torch is not None:
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    return int(numba.get_num_threads())
