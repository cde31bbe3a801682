"""`sparcode eval --index DIR` or `sparcode eval --run RUN_DIR`: quality and cost in one table (thin; see
evaluation.py)."""

from __future__ import annotations

from pathlib import Path

import typer


def eval_(
    index: Path = typer.Option(
        None, "--index", "-i", show_default=False, help="Artifact from `sparcode index`."
    ),
    run: Path = typer.Option(
        None, "--run", "-r", show_default=False, help="A run folder: brute-force exact scoring (any model)."
    ),
    dataset: str = typer.Option(
        None,
        "--dataset",
        "-d",
        show_default=False,
        help="Dataset name or file (prepared with the recorded parameters; default: the recorded one).",
    ),
    split: str = typer.Option("test", "--split", metavar="test|valid", help="Which users to evaluate."),
    k: str = typer.Option("20,50", "--k", help="Cut-offs, comma separated."),
    save_topk: Path = typer.Option(
        None, "--save-topk", show_default=False, help="Write the top-k lists (raw ids) to this Parquet file."
    ),
    threads: int = typer.Option(
        None,
        "--threads",
        show_default=False,
        help="Threads for the timed runs (default: all); 1 is also timed.",
    ),
    latency_queries: int = typer.Option(300, "--latency-queries", help="Single-user queries timed."),
    exact_users: int = typer.Option(2000, "--exact-users", help="Users sampled for the exact overlap@K."),
    device: str = typer.Option(
        None,
        "--device",
        metavar="auto|cpu|cuda[:N]",
        show_default=False,
        help="--run only: where exact scoring runs (default auto: CUDA when present; the timings are then "
        "the GPU's). An index is served on CPU.",
    ),
    probes: int = typer.Option(
        None,
        "--probes",
        show_default=False,
        help="--index of a sparcode run only: code ids each user token reads, its P nearest (default: the "
        "artifact's). Trades QPS for recall without rebuilding the index (codes the index lacks are scored "
        "on the fly, inside the timings).",
    ),
    mirror: str = typer.Option(None, "--mirror", envvar="SPARCODE_MIRROR", help="Mirror for raw data."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress display."),
) -> None:
    """Evaluate an index, or any run by brute force: quality, overlap, QPS, latency, size.

    Reports Recall / NDCG / HitRate / Precision@K, overlap@K with exact scoring, batch QPS and single-query
    latency at 1 thread and at --threads, index size; writes metrics.json and a results.md row next to the
    index (or in the run folder).

    Example: sparcode eval --index out/sparcode --k 20,50 --save-topk topk.parquet
    """
    from rich.console import Console
    from rich.table import Table

    from sparcode_cli.config_schema import EvalOptions, check_options
    from sparcode_cli.errors import UserError
    from sparcode_cli.evaluation import evaluate_index, evaluate_run, parse_ks

    if (index is None) == (run is None):
        raise UserError("give exactly one of --index DIR or --run RUN_DIR")
    options = {
        "split": split,
        "threads": threads,
        "latency_queries": latency_queries,
        "exact_users": exact_users,
        "device": device,
        "probes": probes,
    }
    check_options(EvalOptions, options)
    if run is not None and probes is not None:
        raise UserError(
            "--probes applies to --index (how the index is served); a run is scored with its model.probes",
            "Build and evaluate an index: sparcode index RUN_DIR --out DIR, then sparcode eval --index DIR "
            "--probes P",
        )
    if index is not None and device is not None:
        raise UserError(
            "--device applies to --run (exact scoring); an index is served on CPU",
            "Drop --device, or evaluate the run by exact scoring with --run RUN_DIR --device ...",
        )
    ks = parse_ks(k)
    kw = dict(dataset=dataset, mirror=mirror, save_topk=save_topk, latency_queries=latency_queries)
    if index is not None:
        res = evaluate_index(
            index,
            None,
            split,
            ks,
            threads,
            exact_users=exact_users,
            probes=probes,
            progress=not no_progress,
            **kw,
        )
    else:
        res = evaluate_run(
            run, None, split, ks, threads, device=device or "auto", progress=not no_progress, **kw
        )
    if res is None:
        return  # another rank of a torchrun job: rank 0 reports
    if "world_size" in res:
        sharded_table(res, ks, split)
        return

    table = Table(
        title=f"{res['model']} / {res['retriever']} on {res['dataset']} ({split}, {res['n_users']} users)"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    for kk in ks:
        for name in ("recall", "ndcg", "hitrate", "precision", "overlap", "list_len"):
            table.add_row(f"{name}@{kk}", f"{res[f'{name}@{kk}']:.4f}")
    t, one = res["threads"], "1 thread"
    tn = f"{t} thread" + ("s" if t != 1 else "")

    def opt(v: object, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    table.add_row(f"batch QPS ({tn})", opt(res["qps_batch"], ",.0f"))
    table.add_row(
        f"latency p50 / p99 ms ({tn})",
        f"{opt(res['latency_p50_ms'], '.3f')} / {opt(res['latency_p99_ms'], '.3f')}",
    )
    if t != 1:
        table.add_row(f"batch QPS ({one})", opt(res["qps_batch_1t"], ",.0f"))
        table.add_row(
            f"latency p50 / p99 ms ({one})",
            f"{opt(res['latency_p50_ms_1t'], '.3f')} / {opt(res['latency_p99_ms_1t'], '.3f')}",
        )
    table.add_row(
        "query encoding",
        "included"
        if res["timing_includes_encoding"]
        else f"apart: {opt(res['encode_qps'], ',.0f')} users/s, "
        f"p50 {opt(res['encode_latency_p50_ms'], '.3f')} ms",
    )
    table.add_row(
        "index size", "-" if res["index_bytes"] is None else f"{res['index_bytes'] / 2**20:,.2f} MiB"
    )
    table.add_row("nnz / density", f"{opt(res['nnz'], ',')} / {opt(res['density'], '.4f')}")
    if res.get("probes") is not None:
        table.add_row("probes (codes read per user token)", str(res["probes"]))
    table.add_row("mean list length", f"{res['mean_list_len']:.2f}")
    table.add_row("users on the fly", str(res["users_on_the_fly"]))
    Console().print(table)


def sharded_table(res: dict[str, object], ks: tuple[int, ...], split: str) -> None:
    """What a torchrun-sharded evaluation reports: accuracy only."""
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{res['model']} / {res['retriever']} on {res['dataset']} ({split}, {res['n_users']} users, "
        f"{res['world_size']} processes)"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    for kk in ks:
        for name in ("recall", "ndcg", "hitrate", "precision", "list_len"):
            table.add_row(f"{name}@{kk}", f"{res[f'{name}@{kk}']:.4f}")
    table.add_row("timing", str(res["timing_note"]))
    Console().print(table)
