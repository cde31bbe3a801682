"""Microbenchmark: the SparCode index build at Gowalla's shape against the dense matmul reference (issue #14).

    .venv/bin/python bench/microbench_build.py                     # 65,536 codes (N = 256, M = 2) x 40,981 items
    .venv/bin/python bench/microbench_build.py --codes 4096 --threads 2

What `sparcode index` does per chunk of 256 codes (SparCode.score_codes on the CPU): the compiled cross table
(models/fused_table.split_mlp_table: dot path + one-hidden-layer MLP), the per-code cut (row_cut) and the CSR
append (CSRBuilder.add), here on random weights of the paper's default shape (token_dim 64, K_i 2, H 32,
density 5%). The matmul reference is models' convention in run_bench.py: torch.mm of (256 x F) @ (F x items),
F = D + K_i H multiply-adds per pair. Each stage's rate is the median of `--repeats` passes over the first
`--sample` chunks; the whole build of `--codes` codes is then timed once (`--no-full` skips it).
"""

from __future__ import annotations

import argparse
import os
import time

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codes", type=int, default=65536)
    ap.add_argument("--items", type=int, default=40981)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k-i", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--sample", type=int, default=4, help="chunks timed per stage")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-full", action="store_true", help="skip the one timed build of every code")
    args = ap.parse_args()
    for var in _THREAD_VARS:
        os.environ[var] = str(args.threads)

    import numpy as np
    import torch

    from sparcode_cli.models.fused_table import row_cut, split_mlp_table, split_mlp_table_cut
    from sparcode_cli.retrieval import faiss_index as fi
    from sparcode_cli.retrieval.sparse_index import CSRBuilder
    from sparcode_cli.timing import median_time

    fi.set_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n_cols, d, h, k_i, c = args.items + 1, args.dim, args.hidden, args.k_i, args.chunk
    b = torch.randn(n_cols, k_i, h, generator=g) * 0.3
    t = torch.randn(n_cols, d, generator=g) * 0.1
    w = torch.randn(h, generator=g) * 0.1
    a_all = torch.randn(args.codes, h, generator=g) * 0.3
    z_all = torch.randn(args.codes, d, generator=g) * 0.1
    pairs = c * args.items

    def table(s: int) -> torch.Tensor:
        return split_mlp_table(a_all[s : s + c], b, w, z_all[s : s + c], t, 0.1)

    def table_cut(s: int) -> torch.Tensor:
        return split_mlp_table_cut(a_all[s : s + c], b, w, z_all[s : s + c], t, 0.1, args.density, 0.0, 1e-6)

    with torch.inference_mode():
        gs = [table(s * c) for s in range(args.sample)]  # also compiles / loads the kernels
        t_table = median_time(lambda: [table(s * c) for s in range(args.sample)], args.repeats) / args.sample
        t_cut = median_time(lambda: [row_cut(x.clone(), args.density, 0.0, 1e-6) for x in gs], args.repeats)
        t_clone = median_time(lambda: [x.clone() for x in gs], args.repeats)
        t_cut = (t_cut - t_clone) / args.sample
        table_cut(0)
        t_fused = (
            median_time(lambda: [table_cut(s * c) for s in range(args.sample)], args.repeats) / args.sample
        )
        cut = [row_cut(x.clone(), args.density, 0.0, 1e-6).numpy() for x in gs]

        def csr() -> None:
            bld = CSRBuilder(args.items)
            for s, x in enumerate(cut):
                bld.add(np.arange(s * c, (s + 1) * c), x)
            bld.finish()

        t_csr = median_time(csr, args.repeats) / args.sample
        f = d + k_i * h
        ma, mb = torch.randn(c, f), torch.randn(f, args.items)
        torch.mm(ma, mb)
        mm = pairs / median_time(lambda: torch.mm(ma, mb), max(5, args.repeats))
    stages = (
        ("cross table", t_table),
        ("row cut", t_cut),
        ("table + cut, one kernel", t_fused),
        ("CSR append", t_csr),
        ("build (one kernel + CSR)", t_fused + t_csr),
    )
    print(f"{args.threads} thread(s); {c} codes x {args.items:,} items per chunk; median of {args.repeats}")
    for name, s in stages:
        print(f"  {name:24s} {pairs / s / 1e6:8.1f} M pairs/s = {pairs / s / mm:.3f} x matmul")
    print(f"  matmul reference {mm / 1e6:.1f} M pairs/s (F = {f} multiply-adds per pair)")
    if not args.no_full:
        t0 = time.perf_counter()
        with torch.inference_mode():
            bld = CSRBuilder(args.items)
            for s in range(0, args.codes, c):
                x = table_cut(s)
                bld.add(np.arange(s, min(s + c, args.codes)), x.numpy())
            index = bld.finish()
        dt = time.perf_counter() - t0
        rate = args.codes * args.items / dt
        print(
            f"  all {args.codes:,} codes: {dt:.1f} s, {rate / 1e6:.1f} M pairs/s = {rate / mm:.3f} x matmul; "
            f"nnz {index.nnz:,} ({index.nbytes / 2**20:,.0f} MiB)"
        )


if __name__ == "__main__":
    main()
