"""Microbenchmark: sparse code-index retrieval vs Faiss IndexFlatIP, batch QPS and single-query latency.

    .venv/bin/python bench/microbench_retrieval.py                 # gowalla-sized defaults, 1 thread
    .venv/bin/python bench/microbench_retrieval.py --users 4000 --k 50 --baseline 599220f
    .venv/bin/python bench/microbench_retrieval.py --users 5000 --profile

Synthetic but shaped like the real thing: the index holds ReLU(g + b) with g ~ N(0, 1) and b set so that
`--density` of the (code, item) pairs are positive (4,096 codes x 40,981 items at 5% by default); each user
has K_u codes and a history of gowalla-like length (log-normal, mean ~27, up to 800) that every path masks;
Faiss searches d=64 item vectors with the same masking. `--baseline REV` also times `retrieve` as it was at
git revision REV (its sparse_index.py, taken from git and imported into this process; 599220f is the last
scipy sparse-product path), on the same index and users, and checks it returns the same lists.

Threads: torch, numba, Faiss and BLAS all at `--threads` (default 1), set before anything runs. Every method
runs in the same process. Batch: each of `--repeat` (>= 3) rounds times every chunk of users once per method,
methods interleaved per chunk; the rate is the median over rounds (wall and process CPU time: on a shared
machine the CPU time excludes time spent descheduled). Single queries: per round, each method's queries back
to back (as `sparcode eval` times them); the p50 is the median over rounds. Ratios are taken per round, then
the median. Bytes per query: what the kernel reads at least (benchlib.query_bytes: 4-byte id + 4-byte score per
posting entry, each distinct code once, plus the history), against the read bandwidth measured in the run
(benchlib.read_bandwidth) or `--bandwidth-gbs`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codes", type=int, default=4096)
    ap.add_argument("--items", type=int, default=40981)
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--users", type=int, default=30000)
    ap.add_argument("--ku", type=int, default=4)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="rounds; rates are the median over rounds")
    ap.add_argument("--chunks", type=int, default=10, help="users are timed in this many interleaved chunks")
    ap.add_argument("--latency-queries", type=int, default=300)
    ap.add_argument(
        "--baseline", metavar="REV", help="also time sparse_index.retrieve as of this git revision"
    )
    ap.add_argument(
        "--bandwidth-gbs", type=float, help="read bandwidth to compare with (default: measured, benchlib)"
    )
    ap.add_argument("--no-history", action="store_true", help="mask nothing (every path)")
    ap.add_argument("--profile", action="store_true", help="cProfile one batch retrieve")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.repeat < 3:
        ap.error("--repeat must be >= 3 (the median of at least 3 rounds)")
    for var in _THREAD_VARS:
        os.environ[var] = str(args.threads)

    import numba  # after the thread variables, so every pool starts with that many
    import numpy as np
    import torch
    from benchlib import query_bytes, read_bandwidth

    from sparcode_cli.data.dataset import Ragged
    from sparcode_cli.retrieval import faiss_index as fi
    from sparcode_cli.retrieval.sparse_index import CSRBuilder, TopK, overlap_at_k, retrieve, topk_dense

    fi.set_threads(args.threads)  # Faiss and torch; the retrieval kernel takes torch's count
    numba.set_num_threads(args.threads)
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
        f"index: {index.n_rows} codes x {n_items} items, nnz {index.nnz:,} (density {index.density:.4f}, "
        f"{index.nnz / max(index.n_rows, 1):.0f} per row), {index.nbytes / 2**20:.1f} MiB, built in {build_s:.1f}s"
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
        f"users: {args.users} x K_u={args.ku}; history mean {h_len.mean():.1f}, max {h_len.max()}; k={args.k}; "
        f"threads: torch {torch.get_num_threads()}, numba {numba.get_num_threads()}, "
        f"faiss {fi.get_threads()}, BLAS (env) {os.environ['OPENBLAS_NUM_THREADS']}"
    )

    # ---- faiss
    item_vecs = rng.standard_normal((n_cols, args.dim), dtype=np.float32)
    queries = rng.standard_normal((args.users, args.dim), dtype=np.float32)
    flat = fi.build_faiss_index(item_vecs, "flat")
    raw = flat.index  # the bare IndexFlatIP (ids 0..n-1), for the unmasked reference number

    def raw_search(q, k):
        with fi._blas_from(fi.BLAS_MIN_QUERIES, q.shape[1]):  # the same BLAS cut as fi.search uses
            return raw.search(q, k)

    old = None
    if args.baseline:
        base = _load_baseline(args.baseline)
        old_index = base.CodeIndex(index.matrix, index.code_ids)
        old = lambda codes, h: base.retrieve(old_index, codes, h, args.k)  # noqa: E731

    # each method: (name, fn(user slice, history of the slice))
    methods = [("sparse kernel (masked)", lambda sl, h: retrieve(index, user_codes[sl], h, args.k))]
    if old is not None:
        methods.append((f"sparse @{args.baseline} (masked)", lambda sl, h: old(user_codes[sl], h)))
    methods += [
        ("faiss flat search (masked)", lambda sl, h: fi.search(flat, queries[sl], h, args.k)),
        ("faiss flat raw (k, no mask)", lambda sl, h: raw_search(queries[sl], args.k)),
    ]
    names = [m[0] for m in methods]
    retrieve(index, user_codes[:2], _rows(hist, slice(0, 2)), args.k)  # compile / load the kernel first

    # ---- batch: rounds x interleaved chunks
    chunk = max(1, args.users // args.chunks)
    slices = [slice(s, min(s + chunk, args.users)) for s in range(0, args.users, chunk)]
    hists = [_rows(hist, sl) for sl in slices]
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    parts: dict[str, list] = {n: [] for n in names[:2]}
    for rnd in range(args.repeat):
        w, c = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
        for sl, h in zip(slices, hists, strict=True):
            for name, fn in methods:
                t0, c0 = time.perf_counter(), time.process_time()
                res = fn(sl, h)
                w[name] += time.perf_counter() - t0
                c[name] += time.process_time() - c0
                if rnd == 0 and name in parts:
                    parts[name].append(res)
        for name in names:
            wall[name].append(w[name])
            cpu[name].append(c[name])
    print(
        f"\nbatch QPS over {args.users} users (median of {args.repeat} rounds, {len(slices)} interleaved chunks)"
    )
    for name in names:
        qw, qc = args.users / np.median(wall[name]), args.users / np.median(cpu[name])
        print(f"  {name:32s} wall {qw:8.0f} QPS   cpu {qc:8.0f} QPS")
    for other in names[1:]:
        rw = np.median(np.array(wall[other]) / np.array(wall[names[0]]))
        rc = np.median(np.array(cpu[other]) / np.array(cpu[names[0]]))
        print(f"  kernel QPS / {other}: wall {rw:.2f}, cpu {rc:.2f}")
    top = _concat(parts[names[0]], TopK)
    print(f"  sparse lists: mean length {top.lengths.mean():.2f} (k={args.k})")

    # ---- bytes per query (benchlib.query_bytes, as `make bench` counts them) against the read bandwidth
    qb = query_bytes(index, user_codes, h_len)
    bw_gbs = args.bandwidth_gbs or read_bandwidth(repeats=args.repeat)["bytes_per_s"] / 1e9
    rate = args.users / np.median(cpu[names[0]]) * qb["bytes_per_query"] / 1e9
    print(
        f"  bytes read per query: {qb['bytes_per_query'] / 1e3:.1f} KB ({qb['entries_per_query']:.0f} posting "
        f"entries + history); at the kernel's cpu QPS {rate:.2f} GB/s = {rate / bw_gbs:.3f} of {bw_gbs:.1f} GB/s "
        f"({'given' if args.bandwidth_gbs else 'measured'})"
    )

    # ---- single-query latency (one user per call), methods interleaved per round
    rng2 = np.random.default_rng(args.seed + 1)
    picks = rng2.choice(args.users, size=min(args.latency_queries, args.users), replace=False)
    singles = [(slice(int(u), int(u) + 1), _rows(hist, slice(int(u), int(u) + 1))) for u in picks]
    lat_names = names[:-1]  # the raw Faiss search has no single-query counterpart worth timing
    p50 = {n: [] for n in lat_names}
    p99 = {n: [] for n in lat_names}
    for _ in range(args.repeat):
        for name, fn in methods[: len(lat_names)]:  # each method's queries back to back, as a server would
            lat = []
            for sl, h in singles:
                t0 = time.perf_counter()
                fn(sl, h)
                lat.append(time.perf_counter() - t0)
            p50[name].append(np.percentile(np.array(lat) * 1e3, 50))
            p99[name].append(np.percentile(np.array(lat) * 1e3, 99))
    print(f"\nsingle-query latency over {len(picks)} users (median of {args.repeat} rounds)")
    for name in lat_names:
        print(f"  {name:32s} p50 {np.median(p50[name]):7.3f} ms   p99 {np.median(p99[name]):7.3f} ms")
    for other in lat_names[1:]:
        r = np.median(np.array(p50[names[0]]) / np.array(p50[other]))
        print(f"  kernel p50 / {other} p50: {r:.3f}")

    # ---- exactness: the kernel against dense brute force (and the baseline's lists against the kernel's)
    sl = slice(0, min(200, args.users))
    srt = np.sort(user_codes, axis=1)
    dense = np.zeros((sl.stop, n_cols), dtype=np.float32)
    for j in range(args.ku):  # the codes in ascending order: the kernel's summation order
        dense += index.matrix[srt[sl, j]].toarray()
    ref = topk_dense(dense, _rows(hist, sl), args.k, exclude_nonpositive=True)
    sub = TopK(top.items[sl], top.scores[sl], top.lengths[sl])
    print(
        f"\nexactness ({sl.stop} users vs dense brute force): overlap@{args.k} = {overlap_at_k(sub, ref, args.k)}"
    )
    if old is not None:
        was = _concat(parts[names[1]], TopK)
        same = np.array_equal(was.items, top.items) and np.array_equal(was.lengths, top.lengths)
        print(f"baseline lists identical to the kernel's (items, lengths): {same}")

    if args.profile:
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        retrieve(index, user_codes, hist, args.k)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(14)


def _rows(r, sl: slice):
    """Rows sl of a Ragged, as a Ragged of its own."""
    return type(r)(
        r.indptr[sl.start : sl.stop + 1] - r.indptr[sl.start],
        r.values[r.indptr[sl.start] : r.indptr[sl.stop]],
    )


def _concat(parts: list, topk: type):
    import numpy as np

    return topk(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("items", "scores", "lengths")))


def _load_baseline(rev: str):
    """sparse_index.py as of git revision `rev`, imported from a temporary file under another name (it imports
    only project modules that still exist; a file, so numba can cache its kernels)."""
    import importlib.util
    import tempfile

    path = "src/sparcode_cli/retrieval/sparse_index.py"
    src = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True, check=True
    ).stdout
    name = "_baseline_sparse_index"
    file = Path(tempfile.mkdtemp(prefix="sparcode-baseline-")) / f"{name}.py"
    file.write_text(src)
    spec = importlib.util.spec_from_file_location(name, file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _normal_quantile(p: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(p)


if __name__ == "__main__":
    main()
