"""numba's runtime settings, shared by the compiled kernels (models/fused_table.py, retrieval/sparse_index.py):
the thread pool and the vector width. Imported before any kernel compiles."""

from __future__ import annotations

import os
import sys

import numba

# numba's default "omp" threading layer shares torch's libgomp and, on its first parallel launch, sets the
# OpenMP thread count of the calling thread to NUMBA_NUM_THREADS: torch then ran 2 threads where it was set to
# 1, and two 1-thread training workers spun 4 OpenMP threads on 2 cores (5x slower). numba's own pool does not
# touch OpenMP; set on import, before any kernel runs.
numba.config.THREADING_LAYER = "workqueue"


def wide_vector_features() -> str | None:
    """The host's LLVM feature string with `-prefer-256-bit` when the CPU has AVX-512, else None. LLVM tunes
    AVX-512 CPUs to vectorise at 256 bits; the cross table's loops at 512 bits build the Gowalla index table
    1.36x faster, measured in bench/microbench_build.py (0.37x -> 0.51x of the matmul reference). Values do
    not change: the kernels vectorise over items without reassociation."""
    import llvmlite.binding as ll

    features = ll.get_host_cpu_features().flatten()
    return f"{features},-prefer-256-bit" if "+avx512f" in features.split(",") else None


# An explicit NUMBA_CPU_NAME / NUMBA_CPU_FEATURES (e.g. a portable cache) is left alone. The variable is set
# as well as the config value, since numba re-reads its config from the environment when that changes.
if not (os.environ.get("NUMBA_CPU_NAME") or os.environ.get("NUMBA_CPU_FEATURES")):
    _wide = wide_vector_features()
    if _wide is not None:
        os.environ["NUMBA_CPU_FEATURES"] = _wide
        numba.config.CPU_FEATURES = _wide


def sync_numba_threads() -> int:
    """Give numba torch's intra-op thread count when torch is loaded (what training, evaluation and
    `faiss_index.threads` set); returns the count numba now uses."""
    torch = sys.modules.get("torch")
    if torch is not None:
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    return int(numba.get_num_threads())
