"""`sparcode index RUN_DIR --out DIR`: build the retrieval artifact of a trained run (thin: indexing.py)."""

from __future__ import annotations

from pathlib import Path

import typer


def index(
    run_dir: Path = typer.Argument(
        ..., help="A run folder written by `sparcode train` (sparcode or two-tower)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact folder to write (replaced if it holds one)."),
    bias: float = typer.Option(
        None,
        "--bias",
        show_default=False,
        help="sparcode: shift every code row's cut by b, in the row's std units (trained: 0; > 0 keeps more "
        "items, < 0 fewer; sweep sparsity).",
    ),
    max_per_code: int = typer.Option(
        None, "--max-per-code", show_default=False, help="sparcode: keep only each code's best M items."
    ),
    probes: int = typer.Option(
        None,
        "--probes",
        show_default=False,
        help="sparcode: code ids each user token reads at serving, its P nearest (default: the run's "
        "model.probes). More rows per user: higher recall, lower QPS. The rows are the same; with --codes "
        "reached, the codes that users reach at P are built.",
    ),
    scores: str = typer.Option(
        None,
        "--scores",
        metavar="float32|float16|uint8",
        show_default=False,
        help="sparcode: how the index stores its scores: float32 (default), float16, or uint8 with a scale "
        "per code row (smaller; the ranking may change a little: bench/compact_scores.py measures it).",
    ),
    codes: str = typer.Option(
        None,
        "--codes",
        metavar="auto|reached|all",
        show_default=False,
        help="sparcode: all N^M codes, the codes training and validation users reach, or auto (default: all "
        "when the universe has at most 2^28 (code, item) pairs, else reached).",
    ),
    faiss: str = typer.Option(
        None,
        "--faiss",
        metavar="flat|ivf|hnsw",
        show_default=False,
        help="two-tower: Faiss index kind (flat).",
    ),
    nlist: int = typer.Option(None, "--nlist", show_default=False, help="ivf: lists (default ~4 sqrt(n))."),
    nprobe: int = typer.Option(16, "--nprobe", help="ivf: lists searched."),
    hnsw_m: int = typer.Option(32, "--hnsw-m", help="hnsw: links per node."),
    ef_construction: int = typer.Option(200, "--ef-construction", help="hnsw: build beam width."),
    ef_search: int = typer.Option(
        128, "--ef-search", help="hnsw: search beam width (raised to K + history)."
    ),
    memory_budget_mb: float = typer.Option(
        4096.0, "--memory-budget-mb", help="Refuse a build whose estimated peak memory is larger."
    ),
    threads: int = typer.Option(None, "--threads", show_default=False, help="Torch / Faiss threads."),
    device: str = typer.Option(
        "auto",
        "--device",
        metavar="auto|cpu|cuda[:N]",
        help="Where the model scores the code table and the item vectors (auto: CUDA when present). The "
        "artifact is the same CPU data either way.",
    ),
    dataset: str = typer.Option(
        None,
        "--dataset",
        show_default=False,
        help="Dataset name or file, if the run's processed data is not in the cache (checked by data hash).",
    ),
    mirror: str = typer.Option(None, "--mirror", envvar="SPARCODE_MIRROR", help="Mirror for raw data."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Build a run's retrieval artifact: a SparCode code -> item index or a two-tower Faiss index.

    The folder holds index.npz (or index.faiss), manifest.json, query_encoder.pt and items.parquet, so
    `sparcode eval --index DIR` needs nothing else.

    Example: sparcode index runs/sparcode-movielens-1a2b3c4d --out out/sparcode --max-per-code 500
    """
    from rich.console import Console
    from rich.table import Table

    from sparcode_cli.config_schema import IndexOptions, check_options
    from sparcode_cli.indexing import build_index, summary_rows

    check_options(
        IndexOptions,
        {
            "bias": bias,
            "max_per_code": max_per_code,
            "probes": probes,
            "scores": scores,
            "codes": codes,
            "faiss": faiss,
            "nlist": nlist,
            "nprobe": nprobe,
            "hnsw_m": hnsw_m,
            "ef_construction": ef_construction,
            "ef_search": ef_search,
            "memory_budget_mb": memory_budget_mb,
            "threads": threads,
            "device": device,
        },
    )
    manifest = build_index(
        run_dir,
        out,
        dataset=dataset,
        mirror=mirror,
        bias=bias,
        max_per_code=max_per_code,
        probes=probes,
        scores=scores,
        codes=codes,
        faiss_kind=faiss,
        nlist=nlist,
        nprobe=nprobe,
        hnsw_m=hnsw_m,
        ef_construction=ef_construction,
        ef_search=ef_search,
        memory_budget_mb=memory_budget_mb,
        threads=threads,
        device=device,
        progress=not no_progress,
    )
    from sparcode_cli import distributed as dd

    if not dd.is_main():
        return  # rank 0 of the torchrun job wrote the artifact and reports
    table = Table(title=f"index {out}")
    table.add_column("")
    table.add_column("value", justify="right")
    for label, value in summary_rows(manifest):
        table.add_row(label, value)
    Console().print(table)
