"""Compiled (numba) inference kernels of the cross table and SparCode's per-code cut.

`split_mlp_table`: g(c, i) = <z_c, t_i> / tau + sum_j <w, ReLU(a_c + b_ij)>, the default one-hidden-layer
`mlp` interaction with its dot path. Index build, exact SparCode scoring and all-to-all brute force spend nearly
all their time here. In torch the table is a matmul for the dot path, then a broadcast add, a ReLU and a
matrix-vector product per cache-sized chunk (`interaction.py`): several passes over memory per pair, ~1
GFLOP/s on one core. This kernel is blocked over codes x items: a task takes 16 codes x 512 items, the item
side stored item-major so the inner loops are vectorised over items, each item-side row loaded once for the
16 codes, the accumulators in L1. The ReLU layer is rewritten as ReLU(a + b) = max(b, -a) + a, so an element
costs one max and one FMA, and sum_k w_k a_ck is one number per code. Per (code, item) pair that is D FMAs
(the dot path, as in a matmul) plus 2 K_i H vector operations, against the matmul reference's D + K_i H
FMAs: at the same vector width (512 bits on AVX-512 hosts, numba_runtime.py) the pair rate is bounded by
(D + K_i H) / (D + 2 K_i H) of the matmul's, 2/3 at the paper's shape (D 64, K_i 2, H 32); measured ~0.5.

`row_cut`: SparCode's per-code cut of a table in place, ReLU((g - theta_c) / s_c + b): theta_c the row's
(1 - density) quantile over items 1..n (exact: a strided sample bounds it from below, and only the
values above the bound, ~2x the kept ones, are selected from), s_c the row's std. This is
ReLU(g~ - theta~_c + b) of `SparCode.score_codes` with g~ = (g - mean) / s: standardisation is monotone within
a row, so the quantile commutes with it and the mean cancels; two reads of the row for the moments, one
selection, one write, instead of torch's mean, std, kthvalue and ReLU passes. `split_mlp_table_cut` runs
both in one kernel, a code group's rows cut right after they are computed (1.25x the two calls, measured).

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

from sparcode_cli.numba_runtime import sync_numba_threads

_ITEM_BLOCK = 512  # items per task: the task's accumulators (2 x _CODE_GROUP x 512 floats) stay in L1 / L2
_CODE_GROUP = 16  # codes per task, sharing every load of an item-side row (the register / L1 blocking)
# fastmath without `reassoc`: vectorising over items needs no reassociation, and each element's operations
# then run in the written order whatever the code's or the item's position in its block
_FASTMATH = {"nnan", "ninf", "nsz", "arcp", "contract", "afn"}


@numba.njit(fastmath=_FASTMATH, cache=True, nogil=True, inline="always")
def _tile(
    a: np.ndarray,
    bt: np.ndarray,
    w: np.ndarray,
    z: np.ndarray,
    tt: np.ndarray,
    scale: np.float32,
    c0: int,
    i0: int,
    out: np.ndarray,
    dacc: np.ndarray,
    hacc: np.ndarray,
    coef: np.ndarray,
) -> None:  # pragma: no cover
    """One task: out[c0 + c, i0 + ii] for the _CODE_GROUP codes from c0 and the _ITEM_BLOCK items from i0,
    = <z_c, t_i> * scale + (sum_r w_k max(b_ri, -a_ck) + sum_r w_k a_ck), r = (j, k) over K_i x H
    (ReLU(a + b) = max(b, -a) + a: one max and one FMA per element instead of an add, a max and an FMA).
    bt (K_i * H, I) and tt (D, I) are item-major, so the inner loops run over contiguous items; each item row
    is loaded once for the group's codes. dacc, hacc (_CODE_GROUP, _ITEM_BLOCK) and coef (_CODE_GROUP, 2) are
    the caller's scratch."""
    h = a.shape[1]
    n_rows, n_items = bt.shape
    d = z.shape[1]
    m = min(n_items, i0 + _ITEM_BLOCK) - i0
    dacc[:, :] = 0.0
    hacc[:, :] = 0.0
    k = 0
    while k < d:  # the dot path, two dimensions per pass over the block
        two = k + 1 < d
        for c in range(_CODE_GROUP):
            coef[c, 0] = z[c0 + c, k]
            coef[c, 1] = z[c0 + c, k + 1] if two else np.float32(0.0)
        if two:
            for ii in range(m):
                x0, x1 = tt[k, i0 + ii], tt[k + 1, i0 + ii]
                for c in range(_CODE_GROUP):
                    v = dacc[c, ii]
                    v += coef[c, 0] * x0
                    v += coef[c, 1] * x1
                    dacc[c, ii] = v
        else:
            for ii in range(m):
                x0 = tt[k, i0 + ii]
                for c in range(_CODE_GROUP):
                    dacc[c, ii] += coef[c, 0] * x0
        k += 2
    r = 0
    while r < n_rows:  # the ReLU layer, two (j, k) rows per pass
        two = r + 1 < n_rows
        k0, k1 = r % h, (r + 1) % h
        w0, w1 = w[k0], w[k1] if two else np.float32(0.0)
        for c in range(_CODE_GROUP):
            coef[c, 0] = -a[c0 + c, k0]
            coef[c, 1] = -a[c0 + c, k1]
        if two:
            for ii in range(m):
                x0, x1 = bt[r, i0 + ii], bt[r + 1, i0 + ii]
                for c in range(_CODE_GROUP):
                    v = hacc[c, ii]
                    v += w0 * max(x0, coef[c, 0])
                    v += w1 * max(x1, coef[c, 1])
                    hacc[c, ii] = v
        else:
            for ii in range(m):
                x0 = bt[r, i0 + ii]
                for c in range(_CODE_GROUP):
                    hacc[c, ii] += w0 * max(x0, coef[c, 0])
        r += 2
    for c in range(_CODE_GROUP):
        s = np.float32(0.0)  # the code's linear part, sum_r w_k a_ck
        for rr in range(n_rows):
            s += w[rr % h] * a[c0 + c, rr % h]
        for ii in range(m):
            out[c0 + c, i0 + ii] = dacc[c, ii] * scale + (hacc[c, ii] + s)


@numba.njit(cache=True, nogil=True, inline="always")
def _grid(a: np.ndarray, bt: np.ndarray) -> tuple[int, int]:  # pragma: no cover
    """(code groups, item blocks) of a table: n_codes a multiple of _CODE_GROUP (the caller pads)."""
    return a.shape[0] // _CODE_GROUP, (bt.shape[1] + _ITEM_BLOCK - 1) // _ITEM_BLOCK


@numba.njit(cache=True, nogil=True, inline="always")
def _scratch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover
    """A task's scratch for _tile: the two accumulators and the coefficients."""
    acc = (_CODE_GROUP, _ITEM_BLOCK)
    return np.empty(acc, np.float32), np.empty(acc, np.float32), np.empty((_CODE_GROUP, 2), np.float32)


@numba.njit(parallel=True, fastmath=_FASTMATH, cache=True, nogil=True)
def _table(
    a: np.ndarray,
    bt: np.ndarray,
    w: np.ndarray,
    z: np.ndarray,
    tt: np.ndarray,
    inv_tau: float,
    out: np.ndarray,
) -> None:  # pragma: no cover
    """out (C, I) = the table, one task per (code group, item block): each element is written by one task."""
    n_groups, n_blocks = _grid(a, bt)
    for task in numba.prange(n_groups * n_blocks):
        dacc, hacc, coef = _scratch()
        c0, i0 = (task // n_blocks) * _CODE_GROUP, (task % n_blocks) * _ITEM_BLOCK
        _tile(a, bt, w, z, tt, np.float32(inv_tau), c0, i0, out, dacc, hacc, coef)


@numba.njit(parallel=True, fastmath=_FASTMATH, cache=True, nogil=True)
def _table_cut(
    a: np.ndarray,
    bt: np.ndarray,
    w: np.ndarray,
    z: np.ndarray,
    tt: np.ndarray,
    inv_tau: float,
    keep: int,
    bias: float,
    eps: float,
    out: np.ndarray,
) -> None:  # pragma: no cover
    """_table, then _cut_row on each row, one task per code group: the group's rows (_CODE_GROUP x I floats,
    2.6 MB on Gowalla) are cut while they are still in the core's cache, instead of in a second pass over the
    whole chunk. Column 0 is the padding item."""
    n_groups, n_blocks = _grid(a, bt)
    for grp in numba.prange(n_groups):
        dacc, hacc, coef = _scratch()
        c0 = grp * _CODE_GROUP
        for blk in range(n_blocks):
            _tile(a, bt, w, z, tt, np.float32(inv_tau), c0, blk * _ITEM_BLOCK, out, dacc, hacc, coef)
        for c in range(_CODE_GROUP):
            _cut_row(out[c0 + c], keep, bias, eps)


def _np(x: Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)


_ITEM_MAJOR: list = []  # [(b, t, b version, t version, bt, tt)]: the last item side, transposed


def _item_major(b: Tensor, t: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """b (I, K_i, H) -> (K_i * H, I), t (I, D) -> (D, I), float32 C-contiguous. An index build calls the
    table with the same (cached, eval-mode) item side for every chunk of codes: the last pair is kept (the
    tensors themselves, and their version counters, so an in-place change or a new tensor is transposed
    again)."""
    vb, vt = _version(b), _version(t)
    if _ITEM_MAJOR:
        b0, t0, vb0, vt0, bt, tt = _ITEM_MAJOR[0]
        if b0 is b and t0 is t and vb0 == vb and vt0 == vt:
            return bt, tt
    bt = np.ascontiguousarray(_np(b).reshape(b.shape[0], -1).T)
    tt = np.ascontiguousarray(_np(t).T)
    _ITEM_MAJOR[:] = [(b, t, vb, vt, bt, tt)]
    return bt, tt


def _version(x: Tensor) -> int | None:
    """The tensor's in-place version counter; None for an inference tensor, which has none (the model's item
    cache is made once and replaced, never changed in place)."""
    return None if x.is_inference() else x._version


def _table_inputs(
    a: Tensor, b: Tensor, w: Tensor, z: Tensor, t: Tensor
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The kernels' arrays: the code side padded to whole code groups (the last code repeated: every code
    takes the same path), the item side item-major, and the output (padded codes, I)."""
    a_np, z_np = _np(a), _np(z)
    n = a_np.shape[0]
    pad = (-n) % _CODE_GROUP
    if pad and n:
        a_np = np.concatenate([a_np, np.repeat(a_np[-1:], pad, 0)])
        z_np = np.concatenate([z_np, np.repeat(z_np[-1:], pad, 0)])
    bt, tt = _item_major(b, t)
    out = np.empty((n + pad if n else 0, bt.shape[1]), dtype=np.float32)
    return a_np, bt, _np(w), z_np, tt, out


def split_mlp_table(a: Tensor, b: Tensor, w: Tensor, z: Tensor, t: Tensor, tau: float) -> Tensor:
    """a (C, H) code side, b (I, K_i, H) item side, w (H,), z (C, D) codes, t (I, D) item token sums ->
    (C, I) = <z, t> / tau + sum_j <w, ReLU(a + b_j)>, float32, on the CPU; no autograd."""
    a_np, bt, w_np, z_np, tt, out = _table_inputs(a, b, w, z, t)
    sync_numba_threads()
    if len(a):
        _table(a_np, bt, w_np, z_np, tt, 1.0 / float(tau), out)
    return torch.from_numpy(out[: len(a)]).to(a.device)


def split_mlp_table_cut(
    a: Tensor, b: Tensor, w: Tensor, z: Tensor, t: Tensor, tau: float, density: float, bias: float, eps: float
) -> Tensor:
    """row_cut(split_mlp_table(...), density, bias, eps) in one kernel, each code group's rows cut while in
    cache; every value identical to the two calls (the same element and row code). b's and t's first item is
    the padding item."""
    a_np, bt, w_np, z_np, tt, out = _table_inputs(a, b, w, z, t)
    sync_numba_threads()
    if len(a):
        _table_cut(
            a_np,
            bt,
            w_np,
            z_np,
            tt,
            1.0 / float(tau),
            _keep(out.shape[1], density),
            float(bias),
            float(eps),
            out,
        )
    return torch.from_numpy(out[: len(a)]).to(a.device)


@numba.njit(fastmath=False, cache=True, nogil=True)
def _select(x: np.ndarray, n: int, k: int) -> float:  # pragma: no cover
    """The k-th smallest (0-based) of x[:n], reordering x[:n] in place: quickselect with a median-of-three
    pivot (Numerical Recipes' `select`); numba's np.partition took ~15 ns per element on the cut's candidates."""
    lo, hi = 0, n - 1
    while True:
        if hi <= lo + 1:
            if hi == lo + 1 and x[hi] < x[lo]:
                x[lo], x[hi] = x[hi], x[lo]
            return x[k]
        mid = (lo + hi) >> 1
        x[mid], x[lo + 1] = x[lo + 1], x[mid]
        if x[lo] > x[hi]:
            x[lo], x[hi] = x[hi], x[lo]
        if x[lo + 1] > x[hi]:
            x[lo + 1], x[hi] = x[hi], x[lo + 1]
        if x[lo] > x[lo + 1]:
            x[lo], x[lo + 1] = x[lo + 1], x[lo]
        i, j, pivot = lo + 1, hi, x[lo + 1]
        while True:
            i += 1
            while x[i] < pivot:
                i += 1
            j -= 1
            while x[j] > pivot:
                j -= 1
            if j < i:
                break
            x[i], x[j] = x[j], x[i]
        x[lo + 1] = x[j]
        x[j] = pivot
        if j >= k:
            hi = j - 1
        if j <= k:
            lo = i


@numba.njit(fastmath=False, cache=True, nogil=True)
def _cut_value(row: np.ndarray, keep: int) -> float:  # pragma: no cover
    """The (keep + 1)-th largest value of row (1 <= keep < len(row)), which exactly `keep` values exceed (ties
    aside; torch's kthvalue(n - keep)), exactly: a strided sample gives a lower bound
    that leaves ~2x keep candidates, only those are selected from; a bound that leaves too few falls back to a
    selection over the whole row."""
    n = len(row)
    stride = max(1, n // 1024)
    sample = row[::stride].copy()
    m = len(sample)
    want = min(m - 1, int(2.0 * keep * m / n) + 8)  # ~2x keep candidates expected above the bound
    bound = _select(sample, m, m - 1 - want)
    cand = np.empty(n, dtype=row.dtype)
    cnt = 0
    for i in range(n):  # branch-free: every value written, the count moved by the comparison
        cand[cnt] = row[i]
        cnt += row[i] >= bound
    if cnt < keep + 1:
        return _select(row.copy(), n, n - keep - 1)
    return _select(cand, cnt, cnt - keep - 1)


# reassociation lets LLVM keep several partial sums in vector registers (one running sum waits on each add's
# latency); the order is still fixed by the compiled code, never by the chunking or the thread count
@numba.njit(fastmath=_FASTMATH | {"reassoc"}, cache=True, nogil=True)
def _moments(row: np.ndarray) -> tuple[float, float]:  # pragma: no cover
    """The row's mean and sum of squared deviations, in float64."""
    n = len(row)
    total = 0.0
    for i in range(n):
        total += row[i]
    mean = total / n
    ss = 0.0
    for i in range(n):
        dv = row[i] - mean
        ss += dv * dv
    return mean, ss


@numba.njit(fastmath=False, cache=True, nogil=True)
def _cut_row(g: np.ndarray, keep: int, bias: float, eps: float) -> None:  # pragma: no cover
    """One row in place: g[0] is the padding item, outside every statistic and 0 in the output."""
    row = g[1:]
    n = len(row)
    mean, ss = _moments(row)
    s = np.sqrt(ss / max(n - 1, 1)) + eps
    # every item kept: the threshold one unit (of the row's scale) below the row's minimum
    theta = row.min() - s if keep >= n else _cut_value(row, keep)
    g[0] = 0.0
    for i in range(n):
        v = (row[i] - theta) / s + bias
        row[i] = v if v > 0.0 else 0.0


@numba.njit(parallel=True, fastmath=False, cache=True, nogil=True)
def _row_cut(g: np.ndarray, keep: int, bias: float, eps: float) -> None:  # pragma: no cover
    for r in numba.prange(g.shape[0]):
        _cut_row(g[r], keep, bias, eps)


def _keep(n_cols: int, density: float) -> int:
    """Items kept per row: round(density x n) of the n = n_cols - 1 real items, at least 1."""
    return max(1, round(density * (n_cols - 1)))


def row_cut(g: Tensor, density: float, bias: float, eps: float) -> Tensor:
    """In place on a CPU float32 (codes, n_items + 1) table: every row standardised and cut to its best
    round(density x n) items (at least 1), ReLU((g - theta) / s + bias), column 0 set to 0. Returns g."""
    sync_numba_threads()
    _row_cut(g.numpy(), _keep(g.shape[1], density), float(bias), float(eps))
    return g


def usable(a: Tensor) -> bool:
    """The kernels serve CPU float32 tensors outside autograd (CUDA keeps the torch path)."""
    return a.device.type == "cpu" and a.dtype == torch.float32 and not torch.is_grad_enabled()
