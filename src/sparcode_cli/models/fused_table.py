"""The one-hidden-layer cross table h(c, i) = sum_j <w, ReLU(a_c + b_ij)> for inference, compiled with numba.

Index build, exact SparCode scoring and all-to-all brute force spend nearly all their time here. In torch the
table is a broadcast add, a ReLU and a matrix-vector product per cache-sized chunk (`interaction.py`): three
passes over memory per pre-activation, ~1 GFLOP/s on one core. This kernel keeps each item block in cache and
does add, max and multiply-add in one vectorised pass over H. Every (c, i) is computed by one thread in a
fixed order, so a row's values do not depend on how codes are chunked or on the thread count.

Used only without autograd (training keeps the torch path and its hand-written backward); values agree with
the torch path to float32 rounding (tests/test_fused_table.py).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

_ITEM_BLOCK = 256  # items per block: 256 x K_i x H floats (64 KiB at K_i 2, H 32) stay in L2 across codes


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _table(a: np.ndarray, b: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
    n_codes, h = a.shape
    n_items, k_i, _ = b.shape
    n_blocks = (n_items + _ITEM_BLOCK - 1) // _ITEM_BLOCK
    code_chunk = 16
    n_code_chunks = (n_codes + code_chunk - 1) // code_chunk
    # one task per (code chunk, item block): each output element is written by exactly one task
    for task in numba.prange(n_code_chunks * n_blocks):
        cc, ib = task // n_blocks, task % n_blocks
        c0, c1 = cc * code_chunk, min(n_codes, (cc + 1) * code_chunk)
        i0, i1 = ib * _ITEM_BLOCK, min(n_items, (ib + 1) * _ITEM_BLOCK)
        for c in range(c0, c1):
            ac = a[c]
            for i in range(i0, i1):
                acc = np.float32(0.0)
                for j in range(k_i):
                    bij = b[i, j]
                    for k in range(h):
                        x = ac[k] + bij[k]
                        if x > 0:
                            acc += w[k] * x
                out[c, i] = acc


def split_mlp_table(a: Tensor, b: Tensor, w: Tensor) -> Tensor:
    """a (C, H) code side, b (I, K_i, H) item side, w (H,) -> (C, I), float32, on the CPU; no autograd."""
    a_np = np.ascontiguousarray(a.detach().cpu().numpy(), dtype=np.float32)
    b_np = np.ascontiguousarray(b.detach().cpu().numpy(), dtype=np.float32)
    w_np = np.ascontiguousarray(w.detach().cpu().numpy(), dtype=np.float32)
    out = np.empty((a_np.shape[0], b_np.shape[0]), dtype=np.float32)
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    _table(a_np, b_np, w_np, out)
    return torch.from_numpy(out).to(a.device)


def usable(a: Tensor) -> bool:
    """The kernel serves CPU float32 tensors outside autograd (CUDA keeps the torch path)."""
    return a.device.type == "cpu" and a.dtype == torch.float32 and not torch.is_grad_enabled()
