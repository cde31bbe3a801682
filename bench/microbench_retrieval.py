"""Microbenchmark: sparse code-index retrieval vs Faiss IndexFlatIP, batch QPS and single-query latency.

    .venv/bin/python bench/microbench_retrieval.py                 # gowalla-sized defaults, 1 thread
    .venv/bin/python bench/microbench_retrieval.py --users 5000 --profile

Synthetic but shaped like the real thing: the index holds ReLU(g + b) with g ~ N(0, 1) and b set so that
`--density` of the (code, item) pairs are positive (4,096 codes x 40,981 items at 5% by default); each user
has K_u codes and a history of gowalla-like length (log-normal, mean ~27, up to 800) that both paths mask;
Faiss searches d=64 item vectors with the same masking. Both run at `--threads` (default 1) threads, in the
same process, alternating, best of `--repeat`.
"""

from __future__ import annotations

import argparse
import os
import time

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codes", type=int, default=4096)
    ap.add_argument("--items", type=int, default=40981)
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--users", type=int, default=30000)
    ap.add_argument("--ku", type=int, default=4)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=10, help="users are timed in this many interleaved chunks")
    ap.add_argument("--latency-queries", type=int, default=300)
    ap.add_argument("--no-history", action="store_true", help="mask nothing (both paths)")
    ap.add_argument("--profile", action="store_true", help="cProfile one batch retrieve")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for var in _THREAD_VARS:
        os.environ[var] = str(args.threads)

    import numpy as np  # after the thread variables, so BLAS starts with that many

    from sparcode_cli.data.dataset import Ragged
    from sparcode_cli.retrieval import faiss_index as fi
    from sparcode_cli.retrieval.sparse_index import CSRBuilder, overlap_at_k, retrieve

    fi.set_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    n_items, n_cols = args.items, args.items + 1

    # ---- the sparse index: ReLU(g + b), built chunk by chunk like `sparcode index` does
    t = time.perf_counter()
    bias = np.float32(-_normal_quantile(1.0 - args.density))
    builder = CSRBuilder(n_items)
    for s in range(0, args.codes, 256):
        codes = np.arange(s, min(s + 256, args.codes))
        builder.add(codes, rng.standard_normal((len(codes), n_cols), dtype=np.float32) + bias)
    index = builder.finish()
    build_s = time.perf_counter() - t
    print(
        f"index: {index.n_rows} codes x {n_items} items, nnz {index.nnz:,} (density {index.density:.4f}), "
        f"{index.nbytes / 2**20:.1f} MiB, built in {build_s:.1f}s"
    )

    # ---- users: codes and gowalla-like histories
    user_codes = rng.integers(0, args.codes, size=(args.users, args.ku))
    if args.no_history:
        hist = Ragged.from_lists([[] for _ in range(args.users)])
    else:
        lens = np.clip(np.round(rng.lognormal(np.log(18), 0.9, size=args.users)), 1, 800).astype(np.int64)
        indptr = np.zeros(args.users + 1, dtype=np.int64)
        np.cumsum(lens, out=indptr[1:])
        vals = np.concatenate([rng.choice(n_items, size=n, replace=False) + 1 for n in lens])
        hist = Ragged(indptr, vals)
    h_len = hist.lengths()
    print(
        f"users: {args.users} x K_u={args.ku}; history mean {h_len.mean():.1f}, max {h_len.max()}; "
        f"k={args.k}; threads={args.threads}"
    )

    # ---- faiss
    item_vecs = rng.standard_normal((n_cols, args.dim), dtype=np.float32)
    queries = rng.standard_normal((args.users, args.dim), dtype=np.float32)
    flat = fi.build_faiss_index(item_vecs, "flat")
    raw = flat.index  # the bare IndexFlatIP (ids 0..n-1), for the unmasked reference number

    def raw_search(q, k):
        with fi._blas_from(fi.BLAS_MIN_QUERIES, q.shape[1]):  # the same BLAS cut as fi.search uses
            return raw.search(q, k)

    def run_sparse():
        return retrieve(index, user_codes, hist, args.k)

    # Interleaved: per chunk of users, each method runs back to back, best of --repeat per chunk, summed.
    # Both wall time and process CPU time are reported: on a shared machine the CPU time is the fairer one
    # (at one thread it excludes time spent descheduled), and the ratio is what matters.
    names = ("sparse retrieve (masked)", "faiss flat search (masked)", "faiss flat raw (k, no mask)")
    chunk = max(1, args.users // args.chunks)
    wall = dict.fromkeys(names, 0.0)
    cpu = dict.fromkeys(names, 0.0)
    parts: list = []
    for s in range(0, args.users, chunk):
        sl = slice(s, min(s + chunk, args.users))
        h_sl = Ragged(
            hist.indptr[sl.start : sl.stop + 1] - hist.indptr[sl.start],
            hist.values[hist.indptr[sl.start] : hist.indptr[sl.stop]],
        )
        fns = (
            lambda sl=sl, h=h_sl: retrieve(index, user_codes[sl], h, args.k),
            lambda sl=sl, h=h_sl: fi.search(flat, queries[sl], h, args.k),
            lambda sl=sl: raw_search(queries[sl], args.k),
        )
        bw = dict.fromkeys(names, 1e9)
        bc = dict.fromkeys(names, 1e9)
        for rep in range(args.repeat):
            for name, fn in zip(names, fns, strict=True):
                t, c = time.perf_counter(), time.process_time()
                res = fn()
                bw[name] = min(bw[name], time.perf_counter() - t)
                bc[name] = min(bc[name], time.process_time() - c)
                if name == names[0] and rep == 0:
                    parts.append((sl, res))
        for name in names:
            wall[name] += bw[name]
            cpu[name] += bc[name]
    print(f"\nbatch QPS over all users ({args.chunks} interleaved chunks, best of {args.repeat} each)")
    for name in names:
        print(f"  {name:30s} wall {args.users / wall[name]:8.0f} QPS   cpu {args.users / cpu[name]:8.0f} QPS")
    for label, d in (("wall", wall), ("cpu", cpu)):
        print(
            f"  sparse / faiss-masked QPS ratio ({label}): {d[names[1]] / d[names[0]]:.2f};"
            f"  sparse / faiss-raw: {d[names[2]] / d[names[0]]:.2f}"
        )
    lens_all = np.concatenate([p[1].lengths for p in parts])
    print(f"  sparse lists: mean length {lens_all.mean():.2f} (k={args.k})")

    # ---- single-query latency (one user per call)
    rng2 = np.random.default_rng(args.seed + 1)
    picks = rng2.choice(args.users, size=min(args.latency_queries, args.users), replace=False)
    lat = {"sparse": [], "faiss": []}
    for u in picks:
        h1 = Ragged(np.array([0, h_len[u]]), hist.row(u))
        t = time.perf_counter()
        retrieve(index, user_codes[u : u + 1], h1, args.k)
        lat["sparse"].append(time.perf_counter() - t)
        t = time.perf_counter()
        fi.search(flat, queries[u : u + 1], h1, args.k)
        lat["faiss"].append(time.perf_counter() - t)
    print(f"\nsingle query latency over {len(picks)} users")
    for name, v in lat.items():
        v = np.array(v) * 1e3
        print(f"  {name:8s} p50 {np.percentile(v, 50):7.3f} ms   p99 {np.percentile(v, 99):7.3f} ms")

    # sanity: the sparse path is exact (check a slice against dense brute force)
    from sparcode_cli.retrieval.sparse_index import topk_dense

    sl = slice(0, min(200, chunk))
    dense = np.zeros((sl.stop, n_cols), dtype=np.float32)
    for j in range(args.ku):
        dense += index.matrix[user_codes[sl, j]].toarray()
    ref = topk_dense(
        dense, Ragged.from_lists([hist.row(u) for u in range(sl.stop)]), args.k, exclude_nonpositive=True
    )
    top = parts[0][1]
    sub = type(top)(top.items[sl], top.scores[sl], top.lengths[sl])
    print(
        f"\nexactness check ({sl.stop} users vs dense brute force): overlap@{args.k} = {overlap_at_k(sub, ref, args.k)}"
    )

    if args.profile:
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        run_sparse()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(14)


def _normal_quantile(p: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(p)


if __name__ == "__main__":
    main()
