"""Compiled (numba) inference kernels of the cross table and SparCode's per-code cut.

`split_mlp_table`: g(c, i) = <z_c, t_i> / tau + sum_j <w, ReLU(a_c + b_ij)>, the default one-hidden-layer
`mlp` interaction with its dot path. Index build, exact SparCode scoring and all-to-all brute force spend nearly
all their time here. In torch the table is a matmul for the dot path, then a broadcast add, a ReLU and a
matrix-vector product per cache-sized chunk (`interaction.py`): several passes over memory per pair, ~1
GFLOP/s on one core. This kernel is blocked over codes x items: a task takes 16 codes x 512 items, the item
side stored item-major so the inner loops are vectorised over items, each item-side row loaded once for the
16 codes, the accumulators in L1. The ReLU layer is rewritten as ReLU(a + b) = max(b, -a) + a, so an element
costs one max and one FMA, and sum_k w_k a_ck is one number per code. Per (code, item) pair that is D FMAs
(the dot path, as in a matmul) plus 2 K_i H vector operations, against the matmul reference's D + K_i H: with
the ReLU layer's extra max, and 256-bit vectors (LLVM's choice on this CPU, where the matmul uses 512-bit),
the pair rate is bounded near a third of the matmul's; 1.4-1.6x the previous per-pair kernel, measured.

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

_ITEM_BLOCK = 512  # items per task: the task's accumulators (2 x _CODE_GROUP x 512 floats) stay in L1 / L2
_CODE_GROUP = 16  # codes per task, sharing every load of an item-side row (the register / L1 blocking)
# fastmath without `reassoc`: vectorising over items needs no reassociation, and each element's operations
# then run in the written order whatever the code's or the item's position in its block
_FASTMATH = {"nnan", "ninf", "nsz", "arcp", "contract", "afn"}


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
    """out[c, i] = <z_c, t_i> * inv_tau + (sum_r w_k max(b_ri, -a_ck) + sum_r w_k a_ck), r = (j, k) over K_i x H
    (ReLU(a + b) = max(b, -a) + a: one max and one FMA per element instead of an add, a max and an FMA).
    bt (K_i * H, I) and tt (D, I) are item-major, so the inner loops run over contiguous items; a task is
    _CODE_GROUP codes x _ITEM_BLOCK items, each item row loaded once for the group's codes; n_codes a multiple
    of _CODE_GROUP (the caller pads)."""
    n_codes, h = a.shape
    n_rows, n_items = bt.shape
    d = z.shape[1]
    scale = np.float32(inv_tau)
    n_blocks = (n_items + _ITEM_BLOCK - 1) // _ITEM_BLOCK
    n_groups = n_codes // _CODE_GROUP
    # one task per (code group, item block): each output element is written by exactly one task
    for task in numba.prange(n_groups * n_blocks):
        c0 = (task // n_blocks) * _CODE_GROUP
        i0 = (task % n_blocks) * _ITEM_BLOCK
        m = min(n_items, i0 + _ITEM_BLOCK) - i0
        dacc = np.zeros((_CODE_GROUP, _ITEM_BLOCK), dtype=np.float32)
        hacc = np.zeros((_CODE_GROUP, _ITEM_BLOCK), dtype=np.float32)
        coef = np.empty((_CODE_GROUP, 2), dtype=np.float32)
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


def split_mlp_table(a: Tensor, b: Tensor, w: Tensor, z: Tensor, t: Tensor, tau: float) -> Tensor:
    """a (C, H) code side, b (I, K_i, H) item side, w (H,), z (C, D) codes, t (I, D) item token sums ->
    (C, I) = <z, t> / tau + sum_j <w, ReLU(a + b_j)>, float32, on the CPU; no autograd."""
    a_np, z_np = _np(a), _np(z)
    n = a_np.shape[0]
    pad = (-n) % _CODE_GROUP  # whole code groups (the last code repeated): every code takes the same path
    if pad and n:
        a_np = np.concatenate([a_np, np.repeat(a_np[-1:], pad, 0)])
        z_np = np.concatenate([z_np, np.repeat(z_np[-1:], pad, 0)])
    bt, tt = _item_major(b, t)
    n_items = bt.shape[1]
    out = np.empty((n + pad if n else 0, n_items), dtype=np.float32)
    sync_numba_threads()
    if n:
        _table(a_np, bt, _np(w), z_np, tt, 1.0 / float(tau), out)
    return torch.from_numpy(out[:n] if pad else out).to(a.device)


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
