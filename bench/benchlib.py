"""What the benchmark scripts share: the machine's measured read bandwidth and the bytes a sparse-index query
reads, so `make bench` (run_bench.py) and the microbenchmark compute "fraction of the memory limit" the same
way. Rates are timed with the package's one helper (sparcode_cli.timing.median_time)."""

from __future__ import annotations

import numba
import numpy as np

from sparcode_cli.timing import REPEATS, median_time


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _stream_sum(x: np.ndarray, n_chunks: int) -> float:  # pragma: no cover
    n = len(x)
    step = (n + n_chunks - 1) // n_chunks
    total = 0.0
    for c in numba.prange(n_chunks):
        s = np.float32(0.0)
        for i in range(c * step, min(n, (c + 1) * step)):
            s += x[i]
        total += s
    return total


def read_bandwidth(mib: int = 512, repeats: int = REPEATS) -> dict:
    """Streaming read bandwidth (bytes/s) at numba's current thread count: a vectorised float32 sum over a
    `mib` MiB array (far beyond the last-level cache), the median of `repeats` passes after a warm-up pass."""
    x = np.ones(mib * 2**20 // 4, dtype=np.float32)
    chunks = 64 * numba.get_num_threads()
    _stream_sum(x, chunks)  # compile / load, fault the pages in
    t = median_time(lambda: _stream_sum(x, chunks), repeats)
    return {
        "bytes_per_s": x.nbytes / t,
        "array_mib": mib,
        "threads": numba.get_num_threads(),
        "repeats": repeats,
    }


def query_bytes(index, user_codes: np.ndarray, history_lengths: np.ndarray | None = None) -> dict:  # noqa: ANN001
    """Bytes one query of the sparse index reads from memory at least, on average over the users: each distinct
    code's posting list once (item id + score per entry: 4 + 4 bytes), its row pointer and bound-table row,
    and the user's history ids (8 bytes each, the mask). The kernel walks each list a second time (collecting
    candidates; from cache) and updates a float32 accumulator at each entry (cache-resident): neither is
    counted, so the fraction of the bandwidth limit it gives is an upper bound on how close to it we are.
    Codes without an index row (scored on the fly) count nothing; `users_all_rows` says how many have none."""
    m = index.matrix
    entry = m.indices.itemsize + m.data.itemsize
    srt = np.sort(np.asarray(user_codes, dtype=np.int64), axis=1)
    first = np.ones(srt.shape, dtype=bool)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    rows, found = index.row_of(srt)
    use = first & found
    lens = np.diff(m.indptr)[np.where(found, rows, 0)]
    entries = np.where(use, lens, 0).sum(axis=1)
    per_row = 2 * m.indptr.itemsize + 11 * 4  # indptr pair + the bound-table row
    b = entries * entry + use.sum(axis=1) * per_row
    if history_lengths is not None:
        b = b + np.asarray(history_lengths, dtype=np.int64) * 8
    return {
        "bytes_per_query": float(b.mean()) if len(b) else 0.0,
        "entries_per_query": float(entries.mean()) if len(b) else 0.0,
        "entry_bytes": int(entry),
        "users_all_rows": int(found.all(axis=1).sum()),
        "users": int(len(b)),
    }
