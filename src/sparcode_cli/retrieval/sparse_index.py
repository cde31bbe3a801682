"""The SparCode code -> item inverted index, its chunked builder, and exact sparse top-k retrieval.

    builder = CSRBuilder(n_items, max_per_code=None)
    for codes, scores in chunks:           # scores: dense float32 (len(codes), n_items + 1), computed by the model
        builder.add(codes, scores)         # keeps only scores > 0 (optionally the best max_per_code per code)
    index = builder.finish()               # CodeIndex: CSR (n_codes_built, n_items + 1) + sorted global code ids
    index.save("out/"); index = CodeIndex.load("out/")
    top = retrieve(index, user_codes, history, k=20, on_the_fly=model_scores_codes)

Conventions shared by every retrieval path in this package (sparse index, dense exact scoring, Faiss):
- item ids are 1..n_items; column / item 0 is padding and never returned;
- ties break by (score descending, item id ascending), so two paths that compute the same scores return the
  same lists; for the sparse index a score <= 0 means "not retrieved", so a list may be shorter than k;
- a result is a `TopK`: `items` (U, k) int64 padded with 0, `scores` (U, k) float32 padded with -inf, and
  `lengths` (U,): row u's list is items[u, :lengths[u]].

How `retrieve` works: one numba kernel, no Python per user; a single query takes the same kernel. Per user:
add count x row of each distinct code, in ascending code id, into a float32 accumulator of n_items + 1; clear
the history items; walk the same posting lists again, keeping each entry at or above the user's floor as a
candidate key (score bits, item) and zeroing every entry (only touched entries are reset); the candidates'
best k, sorted, are the list. The floor, a lower bound of the k-th best non-history score, is count x a row's
d-th best score for the first d >= k + |history| of 32, 45, 64, ..., 1024 (a small per-row table, filled when
a query first uses the row); at least d items reach it in that row alone, and float32 sums of scores > 0 only
grow. On Gowalla-shaped rows ~400 of ~8,000 entries pass it. Threads: torch's intra-op count if torch is
loaded, else numba's; thread t has its own accumulator and serves users t, t + T, ...; one thread or one user
runs a serial build (a parallel launch costs ~30 us). Results do not depend on the thread count; scores are
bit-identical to `SparCode.score_all` (same order, same two float32 roundings: product, then sum) and the lists
equal `topk_dense` of them. Codes without a row are scored on the fly into a side CSR read in the same order.

Compact scores (opt-in, `encode_scores`; float32 is the default): "float16" stores each score as float16
(rounded to nearest, kept >= the smallest float16 > 0); "uint8" stores q = round(score / s_r) clipped to
1..255 with s_r = row max / 255 (float32, one per row, kept in the artifact), so no stored entry becomes 0.
The kernel dequantizes on the fly (float16 -> float32 exactly; q x s_r as one float32 product) and then runs
the float32 path on those values: the lists equal an exact top-k of the dequantized scores (same order, same
tie rule), the floor table holds dequantized values. Each encoding is its own compiled specialisation; the
float32 one is the code above, unchanged.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numba
import numpy as np
import scipy.sparse as sp
from numba import types
from numba.extending import overload

from sparcode_cli.atomic import atomic_path
from sparcode_cli.data.dataset import Ragged
from sparcode_cli.errors import UserError
from sparcode_cli.numba_runtime import sync_numba_threads

INDEX_FILE = "index.npz"
CODES_FILE = "index_codes.npz"
REBUILD_HINT = "Rebuild it with `sparcode index`."

History = sp.spmatrix | sp.sparray | Ragged | None
OnTheFly = Callable[[np.ndarray], np.ndarray]

_DEPTHS = np.round(32 * 2 ** (np.arange(11) / 2)).astype(np.int64)  # 32, 45, 64, ..., 1024: bound levels
_TINY = np.float32(np.finfo(np.float32).smallest_subnormal)  # `x >= _TINY` is `x > 0` for float32
ENCODINGS = ("float32", "float16", "uint8")  # how the index stores its scores (see the module notes)
_STORED = {"float32": np.float32, "float16": np.float16, "uint8": np.uint8}
_F16_TO_F32 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


# --------------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class TopK:
    """Top-k lists of U users. Row u's list is items[u, :lengths[u]] (best first); the rest is padding."""

    items: np.ndarray  # int64 (U, k), 0 past lengths[u]
    scores: np.ndarray  # float32 (U, k), -inf past lengths[u]
    lengths: np.ndarray  # int64 (U,)
    n_on_the_fly_users: int = 0  # users that had at least one code scored on the fly (sparse index only)

    @property
    def k(self) -> int:
        return int(self.items.shape[1])

    @property
    def n_users(self) -> int:
        return int(self.items.shape[0])

    def row(self, u: int) -> tuple[np.ndarray, np.ndarray]:
        n = int(self.lengths[u])
        return self.items[u, :n], self.scores[u, :n]

    def to_ragged(self) -> Ragged:
        indptr = np.zeros(self.n_users + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=indptr[1:])
        keep = np.arange(self.k)[None, :] < self.lengths[:, None]
        return Ragged(indptr, self.items[keep].astype(np.int64))

    @staticmethod
    def empty(n_users: int, k: int, n_on_the_fly_users: int = 0) -> TopK:
        return TopK(
            np.zeros((n_users, k), dtype=np.int64),
            np.full((n_users, k), -np.inf, dtype=np.float32),
            np.zeros(n_users, dtype=np.int64),
            n_on_the_fly_users,
        )


def history_csr(history: History, n_users: int, n_cols: int) -> sp.csr_matrix:
    """History as a binary CSR (n_users, n_cols) with sorted indices; the caller's matrix is not modified."""
    if history is None:
        return sp.csr_matrix((n_users, n_cols), dtype=np.float32)
    if isinstance(history, Ragged):
        _check_ragged(history, n_users, n_cols)
        return history.to_csr(n_cols)
    h = sp.csr_matrix(history)
    if h.shape[0] != n_users or h.shape[1] > n_cols:
        raise ValueError(f"history has shape {h.shape}; expected ({n_users}, {n_cols})")
    if h.shape[1] < n_cols:
        h = sp.csr_matrix((h.data, h.indices, h.indptr), shape=(n_users, n_cols))
    if not h.has_canonical_format:
        h = h.copy()
        h.sum_duplicates()
    return h


def _check_ragged(history: Ragged, n_users: int, n_cols: int) -> None:
    if history.n_rows != n_users:
        raise ValueError(f"history has {history.n_rows} rows for {n_users} users")
    if len(history.values) and (history.values.min() < 0 or history.values.max() >= n_cols):
        raise ValueError(f"history item ids must lie in 0..{n_cols - 1}")


def _history_keys(h: sp.csr_matrix, rows: np.ndarray, n_cols: int) -> np.ndarray:
    """Sorted int64 keys local_row * n_cols + item of the history rows `rows` (local row = position)."""
    starts = h.indptr[rows].astype(np.int64)
    lens = h.indptr[rows + 1].astype(np.int64) - starts
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.zeros(len(rows), dtype=np.int64)
    np.cumsum(lens[:-1], out=offsets[1:])
    pos = np.repeat(starts - offsets, lens) + np.arange(total, dtype=np.int64)  # gather the rows' segments
    keys = np.repeat(np.arange(len(rows), dtype=np.int64) * n_cols, lens)
    keys += h.indices[pos]
    return keys  # sorted: rows ascending, indices sorted within a row


def _in_sorted(keys: np.ndarray, sorted_ref: np.ndarray) -> np.ndarray:
    if len(sorted_ref) == 0 or len(keys) == 0:
        return np.zeros(len(keys), dtype=bool)
    pos = np.searchsorted(sorted_ref, keys)
    np.minimum(pos, len(sorted_ref) - 1, out=pos)
    return sorted_ref[pos] == keys


# ------------------------------------------------------------------------------------------------- the index
@dataclass
class CodeIndex:
    """Code -> item scores for the built subset of the code universe.

    `matrix` is CSR (n_rows, n_items + 1), float32 data > 0, canonical (sorted, unique indices), column 0
    (padding item) empty; row r holds the scores of global code id `code_ids[r]` (int64, strictly increasing).
    `max_per_code` is the cap the build used (None = uncapped): on-the-fly rows are capped the same way.
    `encoding` ("float32" | "float16" | "uint8"): the dtype of `matrix.data`; with "uint8", `row_scale`
    (float32 (n_rows,) > 0) dequantizes row r as float32(q) x row_scale[r]. `dequantized()` gives the float32
    values the kernel adds. Build float32, then `encode_scores`.
    """

    matrix: sp.csr_matrix
    code_ids: np.ndarray
    max_per_code: int | None = None
    encoding: str = "float32"
    row_scale: np.ndarray | None = None
    _depth: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _depth_done: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _depth_todo: int = field(default=-1, init=False, repr=False, compare=False)  # rows not yet filled

    def __post_init__(self) -> None:
        m = self.matrix
        if not sp.issparse(m) or m.format != "csr":
            raise ValueError("CodeIndex.matrix must be a scipy CSR matrix")
        if not isinstance(m, sp.csr_matrix):
            m = self.matrix = sp.csr_matrix(m)
        if self.encoding not in ENCODINGS:
            raise ValueError(
                f"unknown score encoding {self.encoding!r}; expected one of {', '.join(ENCODINGS)}"
            )
        if self.encoding == "float32":
            if m.dtype != np.float32:
                m = self.matrix = m.astype(np.float32)
            if self.row_scale is not None:
                raise ValueError("row_scale belongs to the uint8 encoding")
        elif m.dtype != _STORED[self.encoding]:
            raise ValueError(f"a {self.encoding} index stores {self.encoding} data, not {m.dtype}")
        if self.encoding == "uint8":
            scale = None if self.row_scale is None else np.asarray(self.row_scale, dtype=np.float32)
            if (
                scale is None
                or scale.shape != (m.shape[0],)
                or not (np.isfinite(scale).all() and (scale > 0).all())
            ):
                raise ValueError("a uint8 index needs one finite row_scale > 0 per row")
            self.row_scale = scale
        elif self.row_scale is not None:
            raise ValueError("row_scale belongs to the uint8 encoding")
        self.code_ids = np.asarray(self.code_ids, dtype=np.int64)
        if self.code_ids.ndim != 1 or len(self.code_ids) != m.shape[0]:
            raise ValueError(f"{len(self.code_ids)} code ids for {m.shape[0]} index rows")
        if len(self.code_ids) > 1 and not np.all(np.diff(self.code_ids) > 0):
            raise ValueError("code_ids must be strictly increasing")
        if m.shape[1] < 1:
            raise ValueError("the index needs at least the padding column")
        # the retrieval kernel relies on these (its accumulator and floor): every stored score is a finite
        # value > 0, item 0 absent
        if m.nnz and not (np.isfinite(m.data).all() and m.data.min() > 0):
            raise ValueError("index scores must be finite and > 0 (only positive scores are stored)")
        if m.nnz and m.indices.min() < 1:
            raise ValueError("the padding item 0 must not be stored")

    # ---- sizes
    @property
    def n_rows(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.matrix.shape[1]) - 1

    @property
    def nnz(self) -> int:
        return int(self.matrix.nnz)

    @property
    def density(self) -> float:
        """nnz / (rows built x n_items): the fraction of (code, item) pairs that are stored."""
        denom = self.n_rows * self.n_items
        return float(self.nnz / denom) if denom else 0.0

    @property
    def nbytes(self) -> int:
        m = self.matrix
        scale = 0 if self.row_scale is None else self.row_scale.nbytes
        return int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes + self.code_ids.nbytes + scale)

    def dequantized(self) -> sp.csr_matrix:
        """The float32 scores the kernel adds: `matrix` itself for float32, else the decoded copy."""
        m = self.matrix
        if self.encoding == "float32":
            return m
        if self.encoding == "float16":
            data = m.data.astype(np.float32)
        else:
            data = m.data.astype(np.float32) * np.repeat(self.row_scale, np.diff(m.indptr))
        return sp.csr_matrix((data, m.indices, m.indptr), shape=m.shape)

    def _kernel_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(stored values as the kernel reads them, aux): float32 data and an unused empty array; float16 bits
        as uint16 and the float16 -> float32 table; uint8 data and the row scales."""
        data = self.matrix.data
        if self.encoding == "float16":
            return data.view(np.uint16), _F16_TO_F32
        if self.encoding == "uint8":
            return data, self.row_scale
        return data, np.zeros(0, dtype=np.float32)

    def row_nnz(self) -> np.ndarray:
        return np.diff(self.matrix.indptr)

    def row_of(self, code_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row of each global code id: (rows int64 with -1 where absent, found bool), same shape as input."""
        q = np.asarray(code_ids, dtype=np.int64)
        if self.n_rows == 0:
            return np.full(q.shape, -1, dtype=np.int64), np.zeros(q.shape, dtype=bool)
        pos = np.searchsorted(self.code_ids, q).astype(np.int64, copy=False)
        found = self.code_ids.take(pos, mode="clip") == q
        pos[~found] = -1
        return pos, found

    def _depths(self, rows: np.ndarray) -> np.ndarray:
        """(n_rows, len(_DEPTHS)) float32: row r's _DEPTHS[l]-th best score (0 where shorter), the bounds of
        retrieve's kernel; filled lazily (each row sorted once, when a query first uses it) and cached."""
        if self._depth is None:
            self._depth_todo = self.n_rows
            self._depth = np.zeros((self.n_rows, len(_DEPTHS)), dtype=np.float32)
            self._depth_done = np.zeros(self.n_rows, dtype=bool)
        if self._depth_todo:
            todo = rows[~self._depth_done[rows]]
            if len(todo):
                todo = np.unique(todo)
                val, aux = self._kernel_arrays()
                _fill_depths(self.matrix.indptr, val, aux, todo, self._depth)
                self._depth_done[todo] = True
                self._depth_todo -= len(todo)
        return self._depth

    # ---- persistence
    def save(self, folder: str | Path) -> None:
        """Write index.npz (scipy.sparse.save_npz, uncompressed) and index_codes.npz, each atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / CODES_FILE) as tmp, open(tmp, "wb") as fh:
            np.savez(
                fh,
                code_ids=self.code_ids,
                shape=np.array(self.matrix.shape, dtype=np.int64),
                nnz=np.array(self.nnz, dtype=np.int64),
                max_per_code=np.array(-1 if self.max_per_code is None else self.max_per_code, dtype=np.int64),
                encoding=np.array(self.encoding),
                **({} if self.row_scale is None else {"row_scale": self.row_scale}),
            )
        with atomic_path(folder / INDEX_FILE) as tmp, open(tmp, "wb") as fh:
            sp.save_npz(fh, self.matrix, compressed=False)

    @classmethod
    def load(cls, folder: str | Path) -> CodeIndex:
        """Load what `save` wrote; a missing, truncated or inconsistent file is a UserError naming it."""
        folder = Path(folder)
        codes_path, index_path = folder / CODES_FILE, folder / INDEX_FILE
        try:
            with np.load(codes_path, allow_pickle=False) as z:
                code_ids = np.asarray(z["code_ids"], dtype=np.int64)
                shape = tuple(int(s) for s in z["shape"])
                nnz = int(z["nnz"])
                cap = int(z["max_per_code"])
                # older artifacts have no encoding: float32
                encoding = str(z["encoding"]) if "encoding" in z.files else "float32"
                row_scale = np.asarray(z["row_scale"]) if "row_scale" in z.files else None
            if encoding not in ENCODINGS:
                raise ValueError(f"unknown score encoding {encoding!r}")
        except FileNotFoundError:
            raise UserError(f"code index file {codes_path} is missing.", REBUILD_HINT) from None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise UserError(
                f"code index file {codes_path} is truncated or corrupt ({e}).", REBUILD_HINT
            ) from None
        try:
            m = sp.load_npz(index_path)  # np.load(..., allow_pickle=False) inside
        except FileNotFoundError:
            raise UserError(f"code index file {index_path} is missing.", REBUILD_HINT) from None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise UserError(
                f"code index file {index_path} is truncated or corrupt ({e}).", REBUILD_HINT
            ) from None
        problem = _check_matrix(m, shape, nnz, len(code_ids), encoding)
        if problem:
            raise UserError(f"code index file {index_path} is inconsistent: {problem}.", REBUILD_HINT)
        try:
            return cls(sp.csr_matrix(m), code_ids, None if cap < 0 else cap, encoding, row_scale)
        except ValueError as e:
            raise UserError(f"code index file {codes_path} is inconsistent: {e}.", REBUILD_HINT) from None


def _check_matrix(
    m: object, shape: tuple[int, ...], nnz: int, n_codes: int, encoding: str = "float32"
) -> str | None:
    if not sp.issparse(m) or m.format != "csr":
        return "not a CSR matrix"
    if m.shape != shape or m.nnz != nnz or shape[0] != n_codes:
        return f"shape {m.shape} / nnz {m.nnz} do not match {CODES_FILE} (shape {shape}, nnz {nnz})"
    indptr = m.indptr
    if indptr[0] != 0 or indptr[-1] != len(m.indices) or len(m.data) != len(m.indices):
        return "malformed row pointers"
    if np.any(np.diff(indptr) < 0):
        return "malformed row pointers"
    if len(m.indices) and (m.indices.min() < 1 or m.indices.max() >= shape[1]):
        return "item ids out of range (or the padding item 0 stored)"
    if m.dtype != _STORED[encoding] or (
        len(m.data) and not (np.all(np.isfinite(m.data)) and m.data.min() > 0)
    ):
        return f"scores must be finite {encoding} > 0"
    if not m.has_canonical_format:
        return "item ids not sorted/unique within a row"
    return None


# ------------------------------------------------------------------------------------------------- building
def estimate_bytes(
    n_codes: int,
    n_items: int,
    expected_density: float,
    max_per_code: int | None = None,
    chunk_rows: int = 0,
) -> int:
    """Peak memory of a build: twice the final index (chunks, then their concatenation) plus one dense chunk.

    The final index alone is about half of the first term (data 4 B + index 4 B per entry, or 8 B past 2^31).
    """
    per_row = float(expected_density) * n_items
    if max_per_code is not None:
        per_row = min(per_row, float(max_per_code))
    nnz = int(np.ceil(n_codes * per_row))
    idx_bytes = 4 if nnz < 2**31 else 8
    final = nnz * (4 + idx_bytes) + (n_codes + 1) * idx_bytes + n_codes * 8
    return int(2 * final + chunk_rows * (n_items + 1) * 4)


def _keep_mask(scores: np.ndarray, max_per_code: int | None) -> np.ndarray:
    """Entries to store from a dense block: > 0, not column 0, and per row the best max_per_code.

    Ties at the cut go to the smaller item id (score descending, item ascending).
    """
    keep = scores > 0
    keep[:, 0] = False
    if max_per_code is None or max_per_code >= scores.shape[1] - 1:
        return keep
    if max_per_code <= 0:
        return np.zeros_like(keep)
    cap = int(max_per_code)
    s = np.where(keep, scores, -np.inf).astype(np.float32, copy=False)
    kth = -np.partition(-s, cap - 1, axis=1)[:, cap - 1]  # cap-th largest (maybe -inf: fewer than cap kept)
    above = s > kth[:, None]
    eq = (s == kth[:, None]) & keep
    need = cap - above.sum(axis=1)
    eq_rank = np.cumsum(eq, axis=1, dtype=np.int32)  # ids ascending within a row
    return above | (eq & (eq_rank <= need[:, None]))


class CSRBuilder:
    """Assemble a CodeIndex from dense score blocks, chunk by chunk, never holding n_codes x n_items dense.

    `add(code_ids, scores)`: scores float32 (len(code_ids), n_items + 1). Only values > 0 are kept (column 0,
    the padding item, never), optionally only the best `max_per_code` per code with ties (score desc, item
    asc). Chunks may come in any order of code ids; a code id may appear once.
    """

    def __init__(self, n_items: int, max_per_code: int | None = None) -> None:
        self.n_items = int(n_items)
        self.max_per_code = None if max_per_code is None else int(max_per_code)
        self._codes: list[np.ndarray] = []
        self._lens: list[np.ndarray] = []
        self._indices: list[np.ndarray] = []
        self._data: list[np.ndarray] = []
        self.nnz = 0

    def add(self, code_ids: np.ndarray, scores: np.ndarray) -> None:
        code_ids = np.asarray(code_ids, dtype=np.int64).reshape(-1)
        scores = np.asarray(scores)
        if scores.ndim != 2 or scores.shape != (len(code_ids), self.n_items + 1):
            raise ValueError(f"scores shape {scores.shape}; expected ({len(code_ids)}, {self.n_items + 1})")
        if len(code_ids) and code_ids.min() < 0:
            raise ValueError("code ids must be >= 0")
        idx_dtype = np.int64 if self.n_items + 1 > 2**31 - 1 else np.int32
        if self.max_per_code is None and scores.dtype == np.float32 and scores.flags.c_contiguous:
            # every value > 0, in one compiled pass per row after a counting one (index builds take this)
            lens = np.empty(len(code_ids), dtype=np.int64)
            _count_positive(scores, lens)
            ptr = np.zeros(len(code_ids) + 1, dtype=np.int64)
            np.cumsum(lens, out=ptr[1:])
            cols, vals = np.empty(ptr[-1], dtype=idx_dtype), np.empty(ptr[-1], dtype=np.float32)
            _gather_positive(scores, ptr, cols, vals)
        else:
            keep = _keep_mask(scores, self.max_per_code)
            r, c = np.nonzero(keep)  # row-major: item ids ascending within a row
            vals = scores[r, c].astype(np.float32)
            lens = np.bincount(r, minlength=len(code_ids)).astype(np.int64)
            cols = c.astype(idx_dtype)
        if not np.all(np.isfinite(vals)):
            bad = np.flatnonzero(~np.isfinite(vals))[0]
            raise ValueError(
                f"non-finite score for code {code_ids[np.searchsorted(np.cumsum(lens), bad, 'right')]}"
            )
        self._codes.append(code_ids.copy())
        self._lens.append(lens)
        self._indices.append(cols)
        self._data.append(vals)
        self.nnz += len(vals)

    def finish(self) -> CodeIndex:
        codes = np.concatenate(self._codes) if self._codes else np.zeros(0, dtype=np.int64)
        lens = np.concatenate(self._lens) if self._lens else np.zeros(0, dtype=np.int64)
        idx_dtype = np.int32 if self.nnz < 2**31 and self.n_items + 1 < 2**31 else np.int64
        dst_row = np.arange(len(codes))
        if len(codes) > 1 and not np.all(np.diff(codes) > 0):  # rows into code order
            order = np.argsort(codes, kind="stable")
            codes = codes[order]
            if np.any(np.diff(codes) == 0):
                raise ValueError(f"code id {codes[np.flatnonzero(np.diff(codes) == 0)[0]]} was added twice")
            dst_row[order] = np.arange(len(codes))
            lens = lens[order]
        indptr = np.zeros(len(codes) + 1, dtype=np.int64)
        np.cumsum(lens, out=indptr[1:])
        # each chunk's rows copied once, straight to their places (no concatenation, then a permuted copy:
        # fresh pages cost more than the copy here)
        indices, data = np.empty(self.nnz, dtype=idx_dtype), np.empty(self.nnz, dtype=np.float32)
        first = 0
        for part_lens, part_indices, part_data in zip(self._lens, self._indices, self._data, strict=True):
            part_ptr = np.zeros(len(part_lens) + 1, dtype=np.int64)
            np.cumsum(part_lens, out=part_ptr[1:])
            rows = dst_row[first : first + len(part_lens)]
            _scatter_rows(part_ptr, rows, indptr, part_indices, part_data, indices, data)
            first += len(part_lens)
        self._codes, self._lens, self._indices, self._data = [], [], [], []
        shape = (len(codes), self.n_items + 1)
        m = sp.csr_matrix((data, indices, indptr.astype(idx_dtype)), shape=shape)
        m.has_sorted_indices = True
        return CodeIndex(m, codes, self.max_per_code)


def build_csr_from_chunks(
    chunks: Iterable[tuple[np.ndarray, np.ndarray]], n_items: int, max_per_code: int | None = None
) -> CodeIndex:
    """One-call form of CSRBuilder: `chunks` yields (code_ids, dense float32 scores) pairs."""
    b = CSRBuilder(n_items, max_per_code)
    for codes, scores in chunks:
        b.add(codes, scores)
    return b.finish()


def encode_scores(index: CodeIndex, encoding: str) -> CodeIndex:
    """The same index with its scores stored as `encoding` (from a float32 index; see the module notes).

    float16: round to nearest, then at least the smallest float16 > 0; a score above float16's largest is
    refused (ValueError). uint8: per row s = float32(row max / 255), q = clip(round(score / s), 1, 255), so
    every stored entry stays retrievable. The sparsity pattern, code ids and cap are unchanged."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown score encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}")
    if index.encoding == encoding:
        return index
    if index.encoding != "float32":
        raise ValueError(f"encode a float32 index, not a {index.encoding} one")
    m = index.matrix
    scale = None
    if encoding == "float16":
        with np.errstate(over="ignore"):
            data = m.data.astype(np.float16)
        if not np.isfinite(data).all():
            big = float(m.data.max())
            raise ValueError(
                f"a score of {big:.6g} does not fit float16 (max {np.finfo(np.float16).max}); use uint8"
            )
        np.maximum(data, np.float16(np.finfo(np.float16).smallest_subnormal), out=data)
    else:
        lens = np.diff(m.indptr)
        row_max = np.zeros(index.n_rows, dtype=np.float32)
        has = lens > 0
        row_max[has] = np.maximum.reduceat(m.data, m.indptr[:-1][has].astype(np.int64)) if m.nnz else 0
        scale = np.where(has, row_max / np.float32(255), np.float32(1)).astype(np.float32)
        scale = np.maximum(scale, _TINY)  # a row max below 255 x the smallest float32 still gets a scale > 0
        q = np.rint(m.data / np.repeat(scale, lens))
        data = np.clip(q, 1, 255).astype(np.uint8)
    out = sp.csr_matrix((data, m.indices.copy(), m.indptr.copy()), shape=m.shape)
    out.has_sorted_indices = True
    return CodeIndex(out, index.code_ids.copy(), index.max_per_code, encoding, scale)


def prune(index: CodeIndex, shift: float = 0.0, max_per_code: int | None = None) -> CodeIndex:
    """The index a higher bias or a tighter cap would have built, without rescoring (for a bias sweep).

    New score = old - shift (shift >= 0: raising the cut by `shift`), entries <= 0 dropped, then the best
    `max_per_code` per row kept with ties (score desc, item asc). Exact because every dropped pair scored
    <= 0 before and would score even lower now.
    """
    if shift < 0:
        raise ValueError("shift must be >= 0 (a lower cut needs entries that were never stored)")
    if index.encoding != "float32":
        raise ValueError("prune a float32 index (then encode_scores the result)")
    m = index.matrix
    r = np.repeat(np.arange(index.n_rows, dtype=np.int64), np.diff(m.indptr))
    data = (m.data - np.float32(shift)).astype(np.float32) if shift else m.data.copy()
    keep = data > 0
    cap = index.max_per_code
    if max_per_code is not None:
        cap = int(max_per_code) if cap is None else min(cap, int(max_per_code))
        order = np.lexsort((m.indices, -data, r))
        rank = np.empty(len(order), dtype=np.int64)
        starts = m.indptr[:-1].astype(np.int64)
        rank[order] = np.arange(len(order), dtype=np.int64) - starts[r[order]]
        keep &= rank < cap
    lens = np.bincount(r[keep], minlength=index.n_rows)
    indptr = np.zeros(index.n_rows + 1, dtype=np.int64)
    np.cumsum(lens, out=indptr[1:])
    out = sp.csr_matrix((data[keep], m.indices[keep], indptr.astype(m.indptr.dtype)), shape=m.shape)
    return CodeIndex(out, index.code_ids.copy(), cap)


# ------------------------------------------------------------------------------------------------ retrieval
def _otf_index(index: CodeIndex, codes: np.ndarray, on_the_fly: OnTheFly, max_block_bytes: int) -> CodeIndex:
    """Score absent codes with the callback, in blocks, into a small CodeIndex built like the real one."""
    b = CSRBuilder(index.n_items, index.max_per_code)
    step = max(1, int(max_block_bytes // (4 * (index.n_items + 1))))
    for s in range(0, len(codes), step):
        part = codes[s : s + step]
        scores = np.asarray(on_the_fly(part), dtype=np.float32)
        if scores.shape != (len(part), index.n_items + 1):
            raise ValueError(
                f"on_the_fly returned shape {scores.shape}; expected ({len(part)}, {index.n_items + 1})"
            )
        b.add(part, scores)
    return encode_scores(b.finish(), index.encoding)  # stored as the index stores its rows


def _history_arrays(history: History, n_users: int, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """History as int64 (indptr, item ids) with ids checked to lie in 0..n_cols - 1 (order and repeats kept:
    the kernel only clears those entries). A Ragged is used as it is, without building a CSR."""
    if history is None:
        return np.zeros(n_users + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if isinstance(history, Ragged):
        _check_ragged(history, n_users, n_cols)
        return np.asarray(history.indptr, dtype=np.int64), np.asarray(history.values, dtype=np.int64)
    h = history_csr(history, n_users, n_cols)
    return h.indptr.astype(np.int64), h.indices.astype(np.int64)


def retrieve(
    index: CodeIndex,
    user_codes: np.ndarray,
    history: History = None,
    k: int = 20,
    on_the_fly: OnTheFly | None = None,
    *,
    otf_block_bytes: int = 256 << 20,
) -> TopK:
    """Exact top-k per user from the code index: scores = sum over the user's codes of their index rows.

    user_codes: (U, K_u) global code ids (a repeated code counts twice). history: the items to mask per user
    (CSR (U, n_items + 1) binary, or Ragged, or None). Scores <= 0 are "not retrieved"; a row with fewer than
    k retrievable items gives a shorter list. Codes without a row are scored by `on_the_fly(code_ids) ->
    float32 (n, n_items + 1)` (kept > 0 and capped exactly as the build would) and the users needing it are
    counted in `n_on_the_fly_users`. Scores are bit-identical to `SparCode.score_all` (see the module notes).
    """
    codes = np.asarray(user_codes, dtype=np.int64)
    if codes.ndim != 2:
        raise ValueError(f"user_codes must be (U, K_u); got shape {codes.shape}")
    n_users, n_k = codes.shape
    k = int(k)
    n_cols = index.n_items + 1
    out = TopK.empty(n_users, max(k, 0))
    if n_users == 0 or k <= 0 or n_k == 0:
        return out
    if codes.min() < 0:
        raise ValueError("code ids must be >= 0")
    if n_cols > 1 << 32:
        raise ValueError("the kernel's sort key holds item ids below 2^32")
    codes = np.sort(codes, axis=1)  # ascending code ids: the order score_all adds the rows in
    rows, found = index.row_of(codes)
    m = index.matrix
    val, aux = index._kernel_arrays()
    o_ptr, o_idx, o_val = m.indptr[:1] * 0, m.indices[:0], val[:0]
    o_aux = aux if index.encoding == "float16" else aux[:0]
    o_depth = np.zeros((0, len(_DEPTHS)), dtype=np.float32)
    n_otf = 0 if found.all() else int((~found.all(axis=1)).sum())
    if n_otf:
        if on_the_fly is None:
            raise ValueError(
                f"{n_otf} users have codes without a row in the index and no on_the_fly scorer was given"
            )
        otf = _otf_index(index, np.unique(codes[~found]), on_the_fly, otf_block_bytes)
        rows[~found] = index.n_rows + otf.row_of(codes[~found])[0]  # past the index's rows: the otf rows
        o = otf.matrix
        o_ptr, o_idx = o.indptr.astype(m.indptr.dtype), o.indices.astype(m.indices.dtype)
        o_val, o_aux = otf._kernel_arrays()
        o_depth = otf._depths(np.arange(otf.n_rows))
    h_ptr, h_idx = _history_arrays(history, n_users, n_cols)
    n_chunks = max(1, min(sync_numba_threads(), n_users))
    acc = np.zeros((n_chunks, n_cols), dtype=np.float32)
    cand = np.empty((n_chunks, n_cols), dtype=np.int64)
    depth = index._depths(rows[found] if n_otf else rows.ravel())
    kernel = _topk_serial if n_chunks == 1 else _topk_parallel  # a parallel launch costs ~30 us
    kernel(
        rows, index.n_rows, (m.indptr, m.indices, val, depth, aux),
        (o_ptr, o_idx, o_val, o_depth, o_aux), (h_ptr, h_idx), min(k, n_cols - 1), acc, cand,
        (out.items, out.scores.view(np.int32), out.lengths),
    )  # fmt: skip
    return TopK(out.items, out.scores, out.lengths, n_otf)


# ---- the kernel (compiled by numba; coverage does not see it)
# Argument bundles: csr = (indptr, indices, stored scores, depth table, aux) of the index, side = the same
# for the on-the-fly rows (row r >= n_main of a user is side row r - n_main), hist = (indptr, item ids),
# out = (items, score bits as int32, lengths) of the TopK. Stored scores / aux by encoding (_kernel_arrays):
# float32 / unused, float16 bits as uint16 / the float16 -> float32 table, uint8 / the row scales. numba
# compiles each encoding separately; `_row_aux` and `_dequant` resolve at compile time (float32: val[j]).
def _row_aux(val: np.ndarray, aux: np.ndarray, r: int):  # noqa: ANN202  # pragma: no cover
    """What `_dequant` needs for row r: nothing (float32), the table (float16), the row's scale (uint8)."""
    raise NotImplementedError  # compiled only (the overload below)


def _dequant(val: np.ndarray, j: int, row_aux):  # noqa: ANN001, ANN202  # pragma: no cover
    """Stored entry j as the float32 score the kernel adds."""
    raise NotImplementedError  # compiled only (the overload below)


@overload(_row_aux)
def _ov_row_aux(val, aux, r):  # noqa: ANN001, ANN202  # pragma: no cover
    if val.dtype == types.float32:
        return lambda val, aux, r: np.float32(1)
    if val.dtype == types.uint16:
        return lambda val, aux, r: aux
    if val.dtype == types.uint8:
        return lambda val, aux, r: aux[r]
    return None


@overload(_dequant)
def _ov_dequant(val, j, row_aux):  # noqa: ANN001, ANN202  # pragma: no cover
    if val.dtype == types.float32:
        return lambda val, j, row_aux: val[j]
    if val.dtype == types.uint16:
        return lambda val, j, row_aux: row_aux[np.uint64(val[j])]
    if val.dtype == types.uint8:
        return lambda val, j, row_aux: np.float32(val[j]) * row_aux
    return None


@numba.njit(cache=True, nogil=True)
def _add_row(
    acc: np.ndarray, idx: np.ndarray, val: np.ndarray, s: int, e: int, count: np.float32, row_aux
) -> None:  # noqa: ANN001  # pragma: no cover
    for j in range(s, e):  # an unsigned index skips numba's negative-index wraparound (~12% here)
        # float32 product, then float32 sum: score_all's roundings (of the dequantized score when compact)
        acc[np.uint64(idx[j])] += count * _dequant(val, j, row_aux)


@numba.njit(cache=True, nogil=True)
def _collect_row(
    acc: np.ndarray,
    bits: np.ndarray,
    idx: np.ndarray,
    s: int,
    e: int,
    floor: np.float32,
    cand: np.ndarray,
    n: int,
) -> int:  # pragma: no cover
    """Append the key of every entry of the row still >= floor to cand[n:], clear the entries; the new n.

    key = score bits << 32 | (2^32 - 1 - item): for scores > 0 the float bits order like the values, so a
    larger key is a better (score desc, item asc) pair."""
    for j in range(s, e):
        i = np.uint64(idx[j])
        if acc[i] >= floor:
            cand[n] = (np.int64(bits[i]) << 32) | (np.int64(0xFFFFFFFF) - np.int64(i))
            n += 1
        acc[i] = 0
    return n


@numba.njit(cache=True, nogil=True)
def _serve(
    u: int, rows: np.ndarray, n_main: int, csr: tuple, side: tuple, hist: tuple, k: int,
    acc: np.ndarray, cand: np.ndarray, out: tuple,
) -> None:  # fmt: skip  # pragma: no cover
    """User u: add its distinct rows in the given (code id) order, count x row, and take the floor (below);
    clear its history entries; walk the same rows again, keeping the entries >= floor as candidates and
    clearing every entry (acc is zero again); the candidates' best k, sorted, are the list.

    The floor is a lower bound of the user's k-th best non-history score: for the first level d of _DEPTHS
    with d >= k + |history|, count x (a row's d-th best score); at least d items reach it in that row alone,
    and sums of scores > 0 only grow (float32 rounding is monotone). It is the smallest float32 > 0 when no
    level is deep enough. So the candidates hold the whole top-k, ties at the floor included."""
    ptr, idx, val, depth, aux = csr
    o_ptr, o_idx, o_val, o_depth, o_aux = side
    h_ptr, h_idx = hist
    items, score_bits, lengths = out
    bits = acc.view(np.int32)
    n_k = rows.shape[1]
    n_levels = len(_DEPTHS)
    lv = 0
    while lv < n_levels and _DEPTHS[lv] < k + h_ptr[u + 1] - h_ptr[u]:
        lv += 1
    floor = _TINY
    p = 0
    while p < n_k:
        r = rows[u, p]
        q = p + 1
        while q < n_k and rows[u, q] == r:
            q += 1
        c = np.float32(q - p)
        if r < n_main:
            _add_row(acc, idx, val, ptr[r], ptr[r + 1], c, _row_aux(val, aux, r))
            b = c * depth[r, lv] if lv < n_levels else floor
        else:
            s = r - n_main
            _add_row(acc, o_idx, o_val, o_ptr[s], o_ptr[s + 1], c, _row_aux(o_val, o_aux, s))
            b = c * o_depth[s, lv] if lv < n_levels else floor
        floor = max(floor, b)
        p = q
    for j in range(h_ptr[u], h_ptr[u + 1]):
        acc[h_idx[j]] = 0
    n = 0
    for p in range(n_k):
        r = rows[u, p]
        if p > 0 and r == rows[u, p - 1]:
            continue
        if r < n_main:
            n = _collect_row(acc, bits, idx, ptr[r], ptr[r + 1], floor, cand, n)
        else:
            s = r - n_main
            n = _collect_row(acc, bits, o_idx, o_ptr[s], o_ptr[s + 1], floor, cand, n)
    m = min(k, n)
    best = np.sort(np.partition(cand[:n], n - m)[n - m :]) if m < n else np.sort(cand[:n])
    for j in range(m):
        key = best[len(best) - 1 - j]
        items[u, j] = 0xFFFFFFFF - (key & 0xFFFFFFFF)
        score_bits[u, j] = np.int32(key >> 32)
    lengths[u] = m


@numba.njit(cache=True, nogil=True)
def _topk_serial(
    rows: np.ndarray, n_main: int, csr: tuple, side: tuple, hist: tuple, k: int,
    acc: np.ndarray, cand: np.ndarray, out: tuple,
) -> None:  # fmt: skip  # pragma: no cover
    for u in range(rows.shape[0]):
        _serve(u, rows, n_main, csr, side, hist, k, acc[0], cand[0], out)


@numba.njit(parallel=True, cache=True, nogil=True)
def _topk_parallel(
    rows: np.ndarray, n_main: int, csr: tuple, side: tuple, hist: tuple, k: int,
    acc: np.ndarray, cand: np.ndarray, out: tuple,
) -> None:  # fmt: skip  # pragma: no cover
    """Chunk t (its own accumulator and candidate buffer) serves users t, t + T, t + 2T, ..."""
    n_chunks = acc.shape[0]
    for t in numba.prange(n_chunks):
        for u in range(t, rows.shape[0], n_chunks):
            _serve(u, rows, n_main, csr, side, hist, k, acc[t], cand[t], out)


@numba.njit(parallel=True, cache=True, nogil=True)
def _fill_depths(
    ptr: np.ndarray, val: np.ndarray, aux: np.ndarray, rows: np.ndarray, out: np.ndarray
) -> None:  # pragma: no cover
    """out[r, l] = row r's _DEPTHS[l]-th best (dequantized) score (0 where the row is shorter), for r in rows.
    Stored values sort like their scores (float16 > 0 bits as uint16 too), so the d-th best is decoded."""
    for j in numba.prange(len(rows)):
        r = rows[j]
        v = np.sort(val[ptr[r] : ptr[r + 1]])
        n = len(v)
        ra = _row_aux(val, aux, r)
        for lv in range(len(_DEPTHS)):
            out[r, lv] = _dequant(v, n - _DEPTHS[lv], ra) if _DEPTHS[lv] <= n else 0


# ------------------------------------------------------------------------------------------- dense reference
def topk_dense(
    scores: np.ndarray,
    history: History,
    k: int,
    exclude_nonpositive: bool,
    *,
    chunk_elems: int = 1 << 22,
) -> TopK:
    """Top-k of a dense (U, n_items + 1) score array with the same rules as `retrieve`.

    Column 0 and history items are never returned, nor NaN; with `exclude_nonpositive` (SparCode) neither
    is a score <= 0. Ties: (score descending, item id ascending). Works in row chunks of `chunk_elems`.
    Ranking uses the input dtype; the returned scores are float32.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError("scores must be (U, n_items + 1)")
    n_users, n_cols = scores.shape
    k = int(k)
    out = TopK.empty(n_users, max(k, 0))
    if n_users == 0 or k <= 0 or n_cols <= 1:
        return out
    hist = history_csr(history, n_users, n_cols)
    ke = min(k, n_cols)
    step = max(1, chunk_elems // n_cols)
    for s in range(0, n_users, step):
        e = min(n_users, s + step)
        blk = np.array(scores[s:e], dtype=np.result_type(scores.dtype, np.float32), copy=True)
        blk[:, 0] = -np.inf
        h = hist[s:e]
        blk[np.repeat(np.arange(e - s), np.diff(h.indptr)), h.indices] = -np.inf
        bad = np.isnan(blk)
        if exclude_nonpositive:
            bad |= blk <= 0
        blk[bad] = -np.inf
        kth = -np.partition(-blk, ke - 1, axis=1)[:, ke - 1]
        valid = blk > -np.inf
        above = blk > kth[:, None]
        eq = (blk == kth[:, None]) & valid
        need = ke - above.sum(axis=1)
        sel = above | (eq & (np.cumsum(eq, axis=1, dtype=np.int32) <= need[:, None]))
        r, c = np.nonzero(sel)
        v = blk[r, c]
        order = np.lexsort((c, -v, r))
        r, c, v = r[order], c[order], v[order]
        starts = np.searchsorted(r, np.arange(e - s + 1))
        rank = np.arange(len(r)) - starts[r]
        out.items[s + r, rank] = c
        out.scores[s + r, rank] = v.astype(np.float32)
        out.lengths[s:e] = np.diff(starts)
    return out


# -------------------------------------------------------------------------------------------------- overlap
def overlap_at_k(a: TopK, b: TopK, k: int, *, per_user: bool = False) -> float | np.ndarray:
    """Agreement of `a` with the reference `b` at depth k (faiss contrib `knn_intersection` style).

    Per user: A = a's first min(k, len) items, B = b's; overlap = |A ∩ B| / |B|, and when B is empty, 1.0 if
    A is empty too else 0.0. Returned: the mean over users (1.0 for no users), or the per-user array.
    Identical lists give exactly 1.0; it does not look at order within the top k.
    """
    if a.n_users != b.n_users:
        raise ValueError(f"overlap of {a.n_users} vs {b.n_users} users")
    n = a.n_users
    k = int(k)
    la = np.minimum(a.lengths, min(k, a.k))
    lb = np.minimum(b.lengths, min(k, b.k))
    users = np.arange(n, dtype=np.int64)
    ma = np.arange(a.k)[None, :] < la[:, None]
    mb = np.arange(b.k)[None, :] < lb[:, None]
    ka = (users[:, None] << 32 | a.items)[ma]
    kb = np.sort((users[:, None] << 32 | b.items)[mb])
    hits = np.bincount((ka >> 32)[_in_sorted(ka, kb)], minlength=n).astype(np.float64)
    per = np.where(lb > 0, hits / np.maximum(lb, 1), (la == 0).astype(np.float64))
    if per_user:
        return per
    return float(per.mean()) if n else 1.0


def concat_code_indexes(parts: list[CodeIndex]) -> CodeIndex:
    """One index from indexes over disjoint code ranges (e.g. the ranks' shards of a build), rows in code order."""
    parts = [p for p in parts if p.n_rows] or parts[:1]
    if not parts:
        raise ValueError("no index parts")
    if any(p.encoding != "float32" for p in parts):
        raise ValueError("concatenate float32 index parts (then encode_scores the result)")
    caps = {p.max_per_code for p in parts}
    if len(caps) > 1:
        raise ValueError(f"index parts built with different max_per_code: {sorted(caps, key=str)}")
    codes = np.concatenate([p.code_ids for p in parts])
    order = np.argsort(codes, kind="stable")
    m = sp.vstack([p.matrix for p in parts], format="csr")
    if not np.array_equal(order, np.arange(len(codes))):
        m = m[order]
    m.has_sorted_indices = True
    return CodeIndex(m, codes[order], parts[0].max_per_code)


@numba.njit(parallel=True, cache=True, nogil=True)
def _count_positive(scores: np.ndarray, lens: np.ndarray) -> None:  # pragma: no cover
    """lens[r] = how many of scores[r, 1:] are > 0 (column 0 is the padding item)."""
    for r in numba.prange(scores.shape[0]):
        n = 0
        for i in range(1, scores.shape[1]):
            n += scores[r, i] > 0
        lens[r] = n


@numba.njit(parallel=True, cache=True, nogil=True)
def _gather_positive(
    scores: np.ndarray, ptr: np.ndarray, cols: np.ndarray, vals: np.ndarray
) -> None:  # pragma: no cover
    """Row r's values > 0 (columns 1..) and their columns, ascending, into [ptr[r], ptr[r + 1])."""
    for r in numba.prange(scores.shape[0]):
        j = ptr[r]
        for i in range(1, scores.shape[1]):
            v = scores[r, i]
            if v > 0:
                cols[j] = i
                vals[j] = v
                j += 1


@numba.njit(parallel=True, cache=True, nogil=True)
def _scatter_rows(
    src_ptr: np.ndarray,
    dst_rows: np.ndarray,
    dst_ptr: np.ndarray,
    src_indices: np.ndarray,
    src_data: np.ndarray,
    dst_indices: np.ndarray,
    dst_data: np.ndarray,
) -> None:  # pragma: no cover
    """Source row r (src_ptr) becomes destination row dst_rows[r] (dst_ptr)."""
    for r in numba.prange(len(dst_rows)):
        s, d = src_ptr[r], dst_ptr[dst_rows[r]]
        for j in range(src_ptr[r + 1] - s):
            dst_indices[d + j] = src_indices[s + j]
            dst_data[d + j] = src_data[s + j]
