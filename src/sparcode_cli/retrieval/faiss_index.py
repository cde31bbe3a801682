"""Faiss indexes over item vectors for two-tower retrieval, with history masking and the shared tie rule.

    index = build_faiss_index(item_vecs, "hnsw", hnsw_m=32, ef_construction=200, ef_search=128)
    top = search(index, query_vecs, history, k=20)      # -> TopK, the same type the sparse index returns
    save_faiss_index(index, "out/index.faiss"); index = load_faiss_index("out/index.faiss")

`item_vecs` is indexed by item id, (n_items + 1, d) float32; row 0 (padding) is never added. Faiss labels are
the item ids themselves (an IndexIDMap2 for flat / hnsw, `add_with_ids` for ivf), so results need no mapping
and survive save / load. Scores are inner products.

Masking: a batch searches k + (the longest history in the batch) + 1 candidates (HNSW efSearch at least
that), drops history items and re-sorts by (score descending, item id ascending). Users are batched by
history length so short histories are not searched as deep as long ones. If a kept list ends on a score equal
to the last candidate searched (a tie Faiss may have cut arbitrarily), those users are searched again deeper,
so `flat` returns exactly the brute-force lists, ties included.

Speed note: recent Faiss uses its BLAS kernel for flat search only when n_queries x d >= 128,000 (2,000
queries at d=64) and a per-query kernel below that, which at one thread is ~5x slower per query. `search`
lowers that cut to the classic 20 queries for the duration of a call (BLAS_MIN_QUERIES), so the bucketed
batches above stay on the fast kernel; a single query still takes the per-query kernel.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import scipy.sparse as sp

from sparcode_cli.atomic import atomic_path
from sparcode_cli.data.dataset import Ragged
from sparcode_cli.errors import UserError
from sparcode_cli.retrieval.sparse_index import History, TopK, _history_keys, _in_sorted

KINDS = ("flat", "ivf", "hnsw")
FAISS_FILE = "index.faiss"
_ID_SHIFT = 1 << 32  # history / candidate keys: local_row * 2^32 + item id
BLAS_MIN_QUERIES = 20  # flat search uses Faiss's BLAS kernel from this many queries per call


# ------------------------------------------------------------------------------------------------- threads
def get_threads() -> int:
    return int(faiss.omp_get_max_threads())


def set_threads(n: int) -> None:
    """Faiss OpenMP threads (and torch's intra-op threads if torch is loaded); n >= 1."""
    n = max(1, int(n))
    faiss.omp_set_num_threads(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run a block with `n` Faiss (and torch) threads, restoring the previous counts after."""
    prev = get_threads()
    torch = sys.modules.get("torch")
    prev_torch = torch.get_num_threads() if torch is not None else None
    set_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(prev)
        if torch is not None and prev_torch is not None:
            torch.set_num_threads(prev_torch)


# ------------------------------------------------------------------------------------------------ building
def _inner(index: faiss.Index) -> faiss.Index:
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        return faiss.downcast_index(index.index)
    return index


def build_faiss_index(
    item_vecs: np.ndarray,
    kind: str = "flat",
    *,
    items: np.ndarray | None = None,
    nlist: int | None = None,
    nprobe: int = 16,
    hnsw_m: int = 32,
    ef_construction: int = 200,
    ef_search: int = 128,
    seed: int = 0,
) -> faiss.Index:
    """Inner-product index over items 1..n_items (or the given `items` ids) of `item_vecs` (n_items + 1, d).

    kind: "flat" (IndexFlatIP, exact), "ivf" (IndexIVFFlat: `nlist` lists, default ~4 sqrt(n), k-means seeded
    with `seed`; `nprobe` lists searched), "hnsw" (IndexHNSWFlat: `hnsw_m` links, `ef_construction`,
    `ef_search`).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown Faiss index kind {kind!r}; valid: {', '.join(KINDS)}")
    vecs = np.asarray(item_vecs, dtype=np.float32)
    if vecs.ndim != 2 or vecs.shape[0] < 2:
        raise ValueError(f"item_vecs must be (n_items + 1, d) with row 0 = padding; got shape {vecs.shape}")
    ids = np.arange(1, vecs.shape[0], dtype=np.int64) if items is None else np.asarray(items, dtype=np.int64)
    if len(ids) == 0 or ids.min() < 1 or ids.max() >= vecs.shape[0]:
        raise ValueError(f"item ids must lie in 1..{vecs.shape[0] - 1}")
    x = np.ascontiguousarray(vecs[ids])
    n, d = x.shape
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(d, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = int(ef_construction)
        inner.hnsw.efSearch = int(ef_search)
        index = faiss.IndexIDMap2(inner)
    else:
        nl = int(nlist) if nlist else int(round(4 * np.sqrt(n)))
        nl = max(1, min(nl, n))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nl, faiss.METRIC_INNER_PRODUCT)
        quantizer.this.disown()
        index.own_fields = True
        index.cp.seed = int(seed)
        index.train(x)
        index.nprobe = max(1, min(int(nprobe), nl))
    index.add_with_ids(x, ids)
    return index


# ------------------------------------------------------------------------------------------------- persist
def save_faiss_index(index: faiss.Index, path: str | Path) -> None:
    """faiss.write_index to a temporary name, then rename."""
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def load_faiss_index(path: str | Path) -> faiss.Index:
    """faiss.read_index; a missing, truncated or corrupt file is a UserError naming it."""
    path = Path(path)
    hint = "Rebuild it with `sparcode index`."
    if not path.is_file():
        raise UserError(f"Faiss index file {path} is missing.", hint)
    try:
        return faiss.read_index(str(path))
    except (RuntimeError, MemoryError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"Faiss index file {path} is truncated or corrupt ({first}).", hint) from None


# -------------------------------------------------------------------------------------------------- search
def _history(history: History, n_users: int) -> sp.csr_matrix:
    if history is None:
        return sp.csr_matrix((n_users, 1), dtype=np.float32)
    if isinstance(history, Ragged):
        if history.n_rows != n_users:
            raise ValueError(f"history has {history.n_rows} rows for {n_users} queries")
        width = int(history.values.max()) + 1 if len(history.values) else 1
        return history.to_csr(width)
    h = sp.csr_matrix(history)
    if h.shape[0] != n_users:
        raise ValueError(f"history has {h.shape[0]} rows for {n_users} queries")
    if not h.has_canonical_format:
        h = h.copy()
        h.sum_duplicates()
    return h


@contextlib.contextmanager
def _blas_from(n_queries: int, d: int) -> Iterator[None]:
    """Let flat search use BLAS from `n_queries` queries (Faiss's cut is on n_queries x d)."""
    prev = int(faiss.cvar.distance_compute_blas_threshold)
    faiss.cvar.distance_compute_blas_threshold = min(prev, n_queries * d)
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = prev


def _search_raw(index: faiss.Index, q: np.ndarray, ks: int) -> tuple[np.ndarray, np.ndarray]:
    inner = _inner(index)
    if isinstance(inner, faiss.IndexHNSW):
        prev = inner.hnsw.efSearch
        inner.hnsw.efSearch = max(prev, ks)
        try:
            return index.search(q, ks)
        finally:
            inner.hnsw.efSearch = prev
    return index.search(q, ks)


def _rank(
    d: np.ndarray, ids: np.ndarray, hkeys: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask history / missing candidates, sort by (score desc, item asc), keep k: (items, scores, lengths)."""
    b, ks = ids.shape
    local = np.arange(b, dtype=np.int64)[:, None] * _ID_SHIFT
    valid = ids >= 0
    if len(hkeys):
        valid &= ~_in_sorted((local + ids).ravel(), hkeys).reshape(b, ks)
    s = np.where(valid, d, -np.inf).astype(np.float32)
    it = np.where(valid, ids, np.iinfo(np.int64).max)
    order = np.lexsort((it, -s), axis=1)[:, :k]
    items = np.take_along_axis(it, order, axis=1)
    scores = np.take_along_axis(s, order, axis=1)
    lengths = np.minimum(valid.sum(axis=1), k).astype(np.int64)
    pad = np.arange(items.shape[1])[None, :] >= lengths[:, None]
    items[pad] = 0
    scores[pad] = -np.inf
    return items, scores, lengths


def search(
    index: faiss.Index,
    query_vecs: np.ndarray,
    history: History = None,
    k: int = 20,
    *,
    batch_size: int = 4096,
) -> TopK:
    """Top-k item ids per query (inner product), history items masked, ties by (score desc, item asc)."""
    q = np.ascontiguousarray(query_vecs, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != index.d:
        raise ValueError(f"query_vecs must be (n, {index.d}); got shape {q.shape}")
    n_users = q.shape[0]
    k = int(k)
    out = TopK.empty(n_users, max(k, 0))
    ntotal = int(index.ntotal)
    if n_users == 0 or k <= 0 or ntotal == 0:
        return out
    hist = _history(history, n_users)
    h_len = np.diff(hist.indptr).astype(np.int64)
    # similar history lengths share a batch: depths k + |history| within a factor 2 (a power-of-two bucket),
    # so a few long histories do not make every query search deep
    order = np.argsort(h_len, kind="stable")
    bucket = np.ceil(np.log2(k + h_len[order])).astype(np.int64)
    edges = np.flatnonzero(np.diff(bucket)) + 1
    batches = [ub[s : s + batch_size] for ub in np.split(order, edges) for s in range(0, len(ub), batch_size)]
    with _blas_from(BLAS_MIN_QUERIES, q.shape[1]):
        for ub in batches:
            _search_batch(index, q, hist, h_len, ub, k, ntotal, out)
    return out


def _search_batch(
    index: faiss.Index,
    q: np.ndarray,
    hist: sp.csr_matrix,
    h_len: np.ndarray,
    ub: np.ndarray,
    k: int,
    ntotal: int,
    out: TopK,
) -> None:
    """Search users `ub` k + max history + 1 deep, mask, rank; users whose cut may hide a tie go deeper."""
    # one candidate more than masking can consume: a sentinel that shows whether a tie was cut off
    ks = min(ntotal, k + int(h_len[ub].max()) + 1)
    todo = np.arange(len(ub))
    while len(todo):
        u = ub[todo]
        d, ids = _search_raw(index, q[u], ks)
        hkeys = _history_keys(hist, u, _ID_SHIFT)
        items, scores, lengths = _rank(d, ids, hkeys, min(k, ks))
        out.items[u, : items.shape[1]] = items
        out.scores[u, : items.shape[1]] = scores
        out.lengths[u] = lengths
        if ks >= ntotal:
            break
        # the sentinel is never kept; if it ties the k-th kept score, unseen items may tie too: go deeper
        last = d[:, -1]
        cut = (lengths == k) & (ids[:, -1] >= 0) & (scores[:, k - 1] == last)
        todo = todo[cut]
        ks = min(ntotal, 2 * ks)
