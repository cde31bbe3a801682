"""`make bench`: SparCode's sparse index against two-tower + Faiss (flat, hnsw) on real data, in one run.

    .venv/bin/python bench/run_bench.py                       # movielens-100k and gowalla, 1 thread
    .venv/bin/python bench/run_bench.py --threads 2 --datasets movielens-100k

Per dataset (prepared with `--mirror`, default ../shared/data relative to the repository):
1. train a two-tower and a SparCode model (warm-started from the two-tower run, as DESIGN §2 allows; its
   training time counts) with the `make reproduce-full` step budgets and settings, into its runs folder
   (experiments/runs): a finished run with the same run id, from either, is reused;
2. build the SparCode index (the codes training/validation users reach, and the whole N^M universe) and Faiss
   flat and hnsw over the two-tower item vectors;
3. evaluate each on the test users (sparcode_cli.evaluation.evaluate_index): batch QPS, single-query p50/p99
   (query encoding excluded, reported apart), Recall/NDCG@20/50, overlap@50 with exact scoring, index bytes;
4. measure a dense matmul reference in the same process: torch.mm of (codes x F) @ (F x items), F = the
   multiply-adds one (code, item) pair of the interaction costs (dot path + deeper layers + output), so
   `build_vs_matmul` = index build pairs/s / the pairs/s dense matmul would allow for that network (DESIGN §7
   wants >= 0.5); and `qps_vs_flat` = SparCode batch QPS / Faiss flat batch QPS (DESIGN §7 wants >= 1).

Threads are set explicitly (OMP/OPENBLAS/MKL variables before numpy/torch/faiss load, then torch and Faiss)
and reported in every record. Output: bench/results.json (a list of records) and a rich table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="movielens-100k,gowalla")
    ap.add_argument("--mirror", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--threads", type=int, default=1)
    # every run's settings (budgets, a dataset's own recipe) are those of `make reproduce-full`'s seed-0 dnn / mlp
    # runs in experiments/reproduce.toml, so the bench and the full matrix share runs
    ap.add_argument("--no-all-to-all", action="store_true", help="skip the all-to-all record")
    ap.add_argument(
        "--runs",
        type=Path,
        default=ROOT / "experiments" / "runs",
        help="training runs (reused by run id; the default is `make reproduce-full`'s folder, same configs)",
    )
    ap.add_argument("--latency-queries", type=int, default=200)
    ap.add_argument("--exact-users", type=int, default=1000, help="users for the exact overlap@K reference")
    ap.add_argument(
        "--work", type=Path, default=ROOT / "bench", help="out/ (the indexes) goes here (git-ignored)"
    )
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results.json")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    for var in _THREAD_VARS:  # before numpy / torch / faiss start their thread pools
        os.environ[var] = str(args.threads)

    import io

    import torch
    from rich.console import Console
    from rich.table import Table

    from sparcode_cli.atomic import write_json, write_text
    from sparcode_cli.config import load_config, run_id
    from sparcode_cli.data.preprocess import prepare
    from sparcode_cli.data.store import load_dataset
    from sparcode_cli.evaluation import evaluate_index, evaluate_run
    from sparcode_cli.indexing import build_index, versions
    from sparcode_cli.models import load_checkpoint
    from sparcode_cli.provenance import code_digest, git_commit
    from sparcode_cli.retrieval import faiss_index as fi
    from sparcode_cli.training.trainer import run_state, set_aside, train

    fi.set_threads(args.threads)  # Faiss OpenMP and torch intra-op
    torch.set_num_interop_threads(1)
    console = Console()
    if not console.is_terminal:
        console = Console(width=170)
    t_bench = time.perf_counter()
    console.print(
        f"bench: threads {args.threads} (torch {torch.get_num_threads()}, faiss {fi.get_threads()}), "
        f"datasets {args.datasets}, mirror {args.mirror}"
    )

    from sparcode_cli.reproduce.matrix import expand

    def matrix_overrides(dataset: str, model: str) -> list[str]:
        """The --set list `make reproduce-full` trains `model` with on `dataset` (seed 0, dnn, mlp)."""
        for t in expand("reproduce-full", datasets=[dataset]).trains:
            main_run = t.seed == 0 and not t.variant and t.interaction in (None, "mlp")
            if t.model == model and main_run and t.encoder in (None, "dnn"):
                return list(t.overrides)
        raise SystemExit(f"reproduce-full has no seed-0 dnn/mlp {model} run on {dataset}")

    def ensure_run(ds, dataset: str, model: str, init_from: Path | None = None) -> tuple[Path, float]:
        over = [*matrix_overrides(dataset, model), f"train.threads={args.threads}"]
        cfg = load_config(model, overrides=over)
        ident = ds.data_hash
        if init_from is not None:
            ident = f"{ds.data_hash}|init={load_checkpoint(init_from)['run_id']}"
        run_dir = args.runs / run_id(cfg, ds.name, ident)
        if run_state(run_dir) == "stale":  # made by other code: kept aside, trained again
            console.print(f"  {run_dir.name} was made by other code: moved to {set_aside(run_dir)}")
        last = run_dir / "checkpoint_last.pt"
        if last.is_file():
            ck = load_checkpoint(last)
            if ck.get("status") in ("finished", "max-steps", "early-stopped", "fitted"):
                console.print(f"  reusing {run_dir.name} ({ck['step']} steps, {ck['train_time_s']:.1f} s)")
                return run_dir, float(ck["train_time_s"])
        console.print(f"  training {model} ({' '.join(over)}) ...")
        res = train(
            ds,
            cfg,
            args.runs,
            resume=last.is_file(),
            init_from=init_from,
            console=Console(file=io.StringIO()),
            progress=False,
            quiet=True,
            final_eval=False,
        )
        console.print(f"  {res.run_id}: {res.steps} steps in {res.train_time_s:.1f} s")
        return res.run_dir, res.train_time_s

    # load the compiled kernels (numba's on-disk cache) once, so the first dataset's build time is the build's
    from sparcode_cli.models import fused_table

    with torch.inference_mode():
        z = torch.zeros(4, 8)
        g = fused_table.split_mlp_table(z, torch.zeros(16, 2, 8), torch.zeros(8), z, torch.zeros(16, 8), 1.0)
        fused_table.row_cut(torch.cat([g, g], 1), 0.5, 0.0, 1e-6)

    records: list[dict] = []
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        t_ds = time.perf_counter()
        console.print(f"[bold]{name}[/]")
        ds = load_dataset(prepare(name, mirror=args.mirror, progress=False))
        console.print(f"  {ds.n_users:,} users, {ds.n_items:,} items, {len(ds.test.users):,} test users")
        tt_run, tt_s = ensure_run(ds, name, "two-tower")
        sc_run, sc_s = ensure_run(ds, name, "sparcode", init_from=tt_run)
        out = args.work / "out" / name
        builds = [
            ("sparcode-index", sc_run, {"codes": "reached"}, tt_s + sc_s),
            ("sparcode-index-all", sc_run, {"codes": "all"}, tt_s + sc_s),
            ("faiss-flat", tt_run, {"faiss_kind": "flat"}, tt_s),
            ("faiss-hnsw", tt_run, {"faiss_kind": "hnsw"}, tt_s),
        ]
        exact = [("popularity", ensure_run(ds, name, "popularity")[0], 0.0)]
        if not args.no_all_to_all:
            a2a_run, a2a_s = ensure_run(ds, name, "all-to-all", init_from=tt_run)
            exact.append(("all-to-all (brute force)", a2a_run, tt_s + a2a_s))
        by: dict[str, dict] = {}
        jobs = [(r, run, opts, s, True) for r, run, opts, s in builds]
        jobs += [(r, run, {}, s, False) for r, run, s in exact]
        for retriever, run, opts, train_s, indexed in jobs:
            folder = out / retriever
            if indexed:
                m = build_index(run, folder, ds=ds, threads=args.threads, progress=False, **opts)
                r = evaluate_index(
                    folder,
                    ds,
                    "test",
                    (20, 50),
                    args.threads,
                    latency_queries=args.latency_queries,
                    exact_users=args.exact_users,
                )
            else:  # no index: every item scored (score_all), timing includes query encoding
                r = evaluate_run(
                    run, ds, "test", (20, 50), args.threads, latency_queries=args.latency_queries,
                    write=False, progress=False,
                )  # fmt: skip
                m = {"model": load_checkpoint(run)["model"], "run_id": run.name, "index_bytes": None,
                     "build_s": None}  # fmt: skip
            rec = {
                "dataset": name,
                "retriever": retriever,
                "model": m["model"],
                "run_id": m["run_id"],
                "threads": args.threads,
                "n_items": ds.n_items,
                "data_hash": ds.data_hash,
                "content_digest": ds.meta.get("content_digest"),
                "n_test_users": r["n_eval_users"],
                "qps_batch": r["qps_batch"],
                "latency_p50_ms": r["latency_p50_ms"],
                "latency_p99_ms": r["latency_p99_ms"],
                "recall_at_20": r["recall@20"],
                "ndcg_at_20": r["ndcg@20"],
                "recall_at_50": r["recall@50"],
                "ndcg_at_50": r["ndcg@50"],
                "overlap_at_50": r["overlap@50"],
                "overlap_reference": r["overlap_reference"],
                "index_bytes": m["index_bytes"],
                "nnz": m.get("nnz"),
                "density": m.get("density"),
                "n_codes_built": m.get("n_codes_built"),
                "mean_list_len_at_50": r["list_len@50"],
                "users_on_the_fly": r["users_on_the_fly"],
                "encode_qps": r["encode_qps"],
                "build_s": m["build_s"],
                "build_pairs_per_s": m.get("pairs_per_s"),
                "score_pairs_per_s": m.get("score_pairs_per_s"),
                "train_s": train_s,
            }
            by[retriever] = rec
            records.append(rec)
            mib = "-" if rec["index_bytes"] is None else f"{rec['index_bytes'] / 2**20:.1f}"
            console.print(
                f"  {retriever:<24} R@50 {rec['recall_at_50']:.4f}  overlap@50 {rec['overlap_at_50']:.4f}  "
                f"QPS {rec['qps_batch']:,.0f}  p50 {rec['latency_p50_ms']:.3f} ms  {mib} MiB"
            )
        mm = matmul_pairs_per_s(sc_run, ds.n_items, torch)
        flat = by["faiss-flat"]
        for key in ("sparcode-index", "sparcode-index-all"):
            rec = by[key]
            rec["matmul_pairs_per_s"] = mm["pairs_per_s"]
            rec["matmul_flops_per_pair"] = mm["flops_per_pair"]
            rec["matmul_gflops"] = mm["gflops"]
            rec["build_vs_matmul"] = rec["build_pairs_per_s"] / mm["pairs_per_s"]
            rec["score_vs_matmul"] = rec["score_pairs_per_s"] / mm["pairs_per_s"]
            rec["qps_vs_flat"] = rec["qps_batch"] / flat["qps_batch"]
            rec["p50_vs_flat"] = rec["latency_p50_ms"] / flat["latency_p50_ms"]
        console.print(f"  {name} done in {time.perf_counter() - t_ds:.0f} s")

    total = time.perf_counter() - t_bench
    for rec in records:
        rec["bench_s"] = round(total, 1)
        rec["versions"] = versions()
        rec["code_digest"] = code_digest()
        rec["git_commit"] = git_commit()
        rec["cpu"] = cpu_name()
    write_json(args.results, records)
    md = args.results.with_suffix(".md")
    write_text(md, markdown(records, args, total))
    print_table(records, Table, console)
    console.print(f"wrote {args.results} and {md} ({total:.0f} s)")


def matmul_pairs_per_s(run_dir: Path, n_items: int, torch) -> dict:  # noqa: ANN001
    """Dense torch.mm throughput, in (code, item) pairs/s, for F = the multiply-adds of one pair of the run's
    interaction: the dot path (token_dim), the deeper layers ((layers - 1) x k_i x H x H) and the output
    (k_i x H). The split first layer (adds only) is not counted: the reference is generous."""
    from sparcode_cli.models import load_checkpoint

    mc = load_checkpoint(run_dir)["config"]["model"]
    d, k_i = int(mc.get("token_dim", mc["dim"])), int(mc.get("k_i", 2))
    h, layers = int(mc.get("interaction_hidden", 32)), int(mc.get("interaction_layers", 1))
    f = d + (layers - 1) * k_i * h * h + k_i * h
    codes = 256
    a, b = torch.randn(codes, f), torch.randn(f, n_items)
    with torch.inference_mode():
        torch.mm(a, b)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
    pairs = codes * n_items / best
    return {"pairs_per_s": pairs, "flops_per_pair": 2 * f, "gflops": pairs * 2 * f / 1e9}


def markdown(records: list[dict], args: argparse.Namespace, total_s: float) -> str:
    """bench/results.md: per dataset, every retriever with accuracy and cost side by side, then the ratios."""

    def f(v, fmt: str) -> str:  # noqa: ANN001
        return "–" if v is None else format(v, fmt)

    first = records[0] if records else {}
    lines = [
        "# `make bench`",
        "",
        f"{f(first.get('threads'), 'd')} thread(s) (torch, Faiss, numba, BLAS), {first.get('cpu', '?')}; "
        f"{total_s / 60:.1f} min in all. Test split, full ranking with history masked, every test user. QPS: batch "
        "queries per second, retrieval only (indexes) or encoding + scoring every item (brute force); p50/p99: "
        "single-query latency. Build s: the index build (SparCode: scoring and cutting every (code, item) pair "
        "of the built codes). Training: `make reproduce-full`'s seed-0 dnn/mlp runs, same budgets and per-dataset "
        "recipes (experiments/reproduce.toml), SparCode and all-to-all warm-started from the two-tower.",
        "",
        f"Code: commit {first.get('git_commit')}, code digest {first.get('code_digest')}; every run trained by "
        "that code (a run folder made by other code is set aside, never reused).",
        "",
    ]
    cols = ("retriever", "R@20", "R@50", "N@20", "N@50", "QPS", "p50 ms", "p99 ms", "index MB", "density",
            "build s", "overlap@50")  # fmt: skip
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        rows = [r for r in records if r["dataset"] == dataset]
        lines += [
            f"## {dataset} ({rows[0]['n_items']:,} items, {rows[0]['n_test_users']:,} test users)",
            "",
            f"Processed data `{rows[0].get('data_hash')}`, content digest `{rows[0].get('content_digest')}`.",
            "",
        ]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" + "---:|" * (len(cols) - 1)]
        for r in rows:
            mb = None if r["index_bytes"] is None else r["index_bytes"] / 2**20
            cells = [r["retriever"], f(r["recall_at_20"], ".4f"), f(r["recall_at_50"], ".4f"),
                     f(r["ndcg_at_20"], ".4f"), f(r["ndcg_at_50"], ".4f"), f(r["qps_batch"], ",.0f"),
                     f(r["latency_p50_ms"], ".3f"), f(r["latency_p99_ms"], ".3f"), f(mb, ".2f"),
                     f(r.get("density"), ".4f"), f(r.get("build_s"), ".2f"), f(r["overlap_at_50"], ".4f")]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for r in rows:
            if r.get("qps_vs_flat") is not None:
                lines.append(
                    f"- {r['retriever']}: QPS / Faiss flat **{r['qps_vs_flat']:.2f}**, p50 / flat "
                    f"{r['p50_vs_flat']:.2f}; build {f(r['build_pairs_per_s'], ',.0f')} pairs/s = "
                    f"**{r['build_vs_matmul']:.2f}** x the matmul reference ({r['matmul_pairs_per_s']:,.0f} "
                    f"pairs/s at {r['matmul_flops_per_pair']} flops/pair; scoring alone {r['score_vs_matmul']:.2f} x)"
                )
        lines.append("")
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def print_table(records: list[dict], Table, console) -> None:  # noqa: ANN001, N803
    t = Table(title=f"bench ({records[0]['threads'] if records else '?'} thread(s))")
    cols = ["dataset", "retriever", "R@50", "overlap@50", "QPS", "p50 ms", "p99 ms", "MiB", "on the fly",
            "QPS/flat", "build/matmul"]  # fmt: skip
    for c in cols:
        t.add_column(c, justify="left" if c in ("dataset", "retriever") else "right")

    def f(v, fmt: str) -> str:  # noqa: ANN001
        return "-" if v is None else format(v, fmt)

    for r in records:
        t.add_row(
            r["dataset"],
            r["retriever"],
            f(r["recall_at_50"], ".4f"),
            f(r["overlap_at_50"], ".4f"),
            f(r["qps_batch"], ",.0f"),
            f(r["latency_p50_ms"], ".3f"),
            f(r["latency_p99_ms"], ".3f"),
            f(None if r["index_bytes"] is None else r["index_bytes"] / 2**20, ".1f"),
            str(r["users_on_the_fly"]),
            f(r.get("qps_vs_flat"), ".2f"),
            f(r.get("build_vs_matmul"), ".3f"),
        )
    console.print(t)


if __name__ == "__main__":
    sys.exit(main())
