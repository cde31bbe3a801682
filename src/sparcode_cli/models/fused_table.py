"""Compiled (numba) inference kernels of the cross table and SparCode's per-code cut.

`split_mlp_table`: g(c, i) = <z_c, t_i> / tau + sum_j <w, ReLU(a_c + b_ij)>, the default one-hidden-layer
`mlp` interaction with its dot path. Index build, exact SparCode scoring and all-to-all brute force spend nearly
all their time here. In torch the table is a matmul for the dot path, then a broadcast add, a ReLU and a
matrix-vector product per cache-sized chunk (`interaction.py`): several passes over memory per pair, ~1
GFLOP/s on one core. This kernel keeps an item block in cache and computes each pair, dot path included, in
one vectorised pass. (Four codes per loaded item vector gave no measurable gain and made a code's last bit
depend on its position in the group, i.e. on how the caller chunks codes.)

`row_cut`: SparCode's per-code cut of a table in place, ReLU((g - theta_c) / s_c + b): theta_c the row's
(1 - density) quantile over items 1..n (exact: a strided sample bounds it from below, and only the
values above the bound, ~2x the kept ones, are partitioned), s_c the row's std. This is
ReLU(g~ - theta~_c + b) of `SparCode.score_codes` with g~ = (g - mean) / s: standardisation is monotone within
a row, so the quantile commutes with it and the mean cancels; one read of the row for the std, one selection,
one write, instead of torch's mean, std, kthvalue and ReLU passes.

Every output element (and every row's threshold) is computed by one thread in a fixed order, so values do
not depend on how codes are chunked or on the thread count. Used only without autograd (training keeps the
torch path and its hand-written backward); values agree with the torch path to float32 rounding
(tests/test_fused_table.py).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

from sparcode_cli.numba_threads import sync_numba_threads

_ITEM_BLOCK = 256  # items per block: 256 x (K_i x H + D) floats (~128 KiB at K_i 2, H 32, D 64) stay in L2


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _table(
    a: np.ndarray, b: np.ndarray, w: np.ndarray, z: np.ndarray, t: np.ndarray, inv_tau: float, out: np.ndarray
) -> None:  # pragma: no cover
    n_codes, h = a.shape
    n_items, k_i, _ = b.shape
    d = z.shape[1]
    scale = np.float32(inv_tau)
    n_blocks = (n_items + _ITEM_BLOCK - 1) // _ITEM_BLOCK
    code_chunk = 16
    n_code_chunks = (n_codes + code_chunk - 1) // code_chunk
    # one task per (code chunk, item block): each output element is written by exactly one task
    for task in numba.prange(n_code_chunks * n_blocks):
        cc, ib = task // n_blocks, task % n_blocks
        c0, c1 = cc * code_chunk, min(n_codes, (cc + 1) * code_chunk)
        i0, i1 = ib * _ITEM_BLOCK, min(n_items, (ib + 1) * _ITEM_BLOCK)
        for c in range(c0, c1):
            ac, zc = a[c], z[c]
            for i in range(i0, i1):
                ti = t[i]
                dc = np.float32(0.0)
                for k in range(d):
                    dc += zc[k] * ti[k]
                hc = np.float32(0.0)
                for j in range(k_i):
                    bij = b[i, j]
                    for k in range(h):
                        x = ac[k] + bij[k]
                        if x > 0:
                            hc += w[k] * x
                out[c, i] = dc * scale + hc


def _np(x: Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)


def split_mlp_table(a: Tensor, b: Tensor, w: Tensor, z: Tensor, t: Tensor, tau: float) -> Tensor:
    """a (C, H) code side, b (I, K_i, H) item side, w (H,), z (C, D) codes, t (I, D) item token sums ->
    (C, I) = <z, t> / tau + sum_j <w, ReLU(a + b_j)>, float32, on the CPU; no autograd."""
    a_np, z_np = _np(a), _np(z)
    out = np.empty((a_np.shape[0], b.shape[0]), dtype=np.float32)
    sync_numba_threads()
    _table(a_np, _np(b), _np(w), z_np, _np(t), 1.0 / float(tau), out)
    return torch.from_numpy(out).to(a.device)


@numba.njit(fastmath=False, cache=True, nogil=True)
def _cut_value(row: np.ndarray, keep: int) -> float:  # pragma: no cover
    """The (keep + 1)-th largest value of row (1 <= keep < len(row)), which exactly `keep` values exceed (ties
    aside; torch's kthvalue(n - keep)), exactly: a strided sample gives a lower bound
    that leaves ~2x keep candidates, only those are partitioned; a bound that leaves too few falls back to a
    partition of the whole row."""
    n = len(row)
    stride = max(1, n // 1024)
    sample = row[::stride].copy()
    m = len(sample)
    want = min(m - 1, int(2.0 * keep * m / n) + 8)  # ~2x keep candidates expected above the bound
    bound = np.partition(sample, m - 1 - want)[m - 1 - want]
    cand = np.empty(n, dtype=row.dtype)
    cnt = 0
    for i in range(n):
        if row[i] >= bound:
            cand[cnt] = row[i]
            cnt += 1
    if cnt < keep + 1:
        return np.partition(row.copy(), n - keep - 1)[n - keep - 1]
    return np.partition(cand[:cnt], cnt - keep - 1)[cnt - keep - 1]


@numba.njit(parallel=True, fastmath=False, cache=True, nogil=True)
def _row_cut(g: np.ndarray, keep: int, bias: float, eps: float) -> None:  # pragma: no cover
    n_rows, n_cols = g.shape
    n = n_cols - 1  # column 0 is the padding item: outside every statistic, 0 in the output
    for r in numba.prange(n_rows):
        row = g[r, 1:]
        mean = 0.0
        for i in range(n):
            mean += row[i]
        mean /= n
        ss = 0.0
        for i in range(n):
            dv = row[i] - mean
            ss += dv * dv
        s = np.sqrt(ss / max(n - 1, 1)) + eps
        # every item kept: the threshold one unit (of the row's scale) below the row's minimum
        theta = row.min() - s if keep >= n else _cut_value(row, keep)
        g[r, 0] = 0.0
        for i in range(n):
            v = (row[i] - theta) / s + bias
            row[i] = v if v > 0.0 else 0.0


def row_cut(g: Tensor, density: float, bias: float, eps: float) -> Tensor:
    """In place on a CPU float32 (codes, n_items + 1) table: every row standardised and cut to its best
    round(density x n) items (at least 1), ReLU((g - theta) / s + bias), column 0 set to 0. Returns g."""
    n = g.shape[1] - 1
    keep = max(1, round(density * n))
    sync_numba_threads()
    _row_cut(g.numpy(), keep, float(bias), float(eps))
    return g


def usable(a: Tensor) -> bool:
    """The kernels serve CPU float32 tensors outside autograd (CUDA keeps the torch path)."""
    return a.device.type == "cpu" and a.dtype == torch.float32 and not torch.is_grad_enabled()
