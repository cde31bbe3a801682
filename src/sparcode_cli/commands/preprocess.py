"""`sparcode preprocess NAME|PATH`: raw files -> filtered, split, featurised Parquet + meta.json (thin)."""

from __future__ import annotations

import typer
from rich.console import Console

SPLITS = ("time", "users", "given")


def preprocess(
    dataset: str = typer.Argument(
        ..., metavar="NAME|PATH", help="Dataset name (see `sparcode datasets`) or your own CSV/Parquet file."
    ),
    split: str | None = typer.Option(
        None,
        "--split",
        metavar="time|users|given",
        help="time: per-user chronological 80/10/10 (default); users: held-out users 80/10/10; "
        "given: the dataset's own train/test (gowalla, yelp2018, amazon-book; their default).",
    ),
    min_count: int | None = typer.Option(
        None,
        "--min-count",
        help="k of the iterative k-core filter on users and items (default 5; 0 for given).",
    ),
    rating_threshold: float | None = typer.Option(
        None, "--rating-threshold", help="Keep only ratings >= this (default: every rating counts)."
    ),
    max_history: int = typer.Option(50, "--max-history", help="History length L that training reads."),
    seed: int = typer.Option(0, "--seed", help="Seed of the users / given splits."),
    skip_bad_rows: bool = typer.Option(
        False, "--skip-bad-rows", help="Drop (and count) malformed rows instead of stopping at the first."
    ),
    mirror: str | None = typer.Option(
        None, "--mirror", metavar="URL|DIR", help="Where to fetch raw files that are not cached yet."
    ),
) -> None:
    """Preprocess a dataset: implicit feedback, k-core, dense ids, split, features; prints a data card.

    The result lands in $SPARCODE_HOME/processed/NAME-HASH and is reused when nothing changed.

    Example: sparcode preprocess movielens --split time --min-count 5
    """
    from sparcode_cli.data.card import print_card
    from sparcode_cli.data.preprocess import prepare
    from sparcode_cli.data.store import read_meta
    from sparcode_cli.errors import UserError

    if split is not None and split not in SPLITS:
        raise UserError(f"unknown split {split!r}", f"Choose one of: {', '.join(SPLITS)}.")
    console = Console(highlight=False)
    folder = prepare(
        dataset,
        split=split,
        min_count=min_count,
        rating_threshold=rating_threshold,
        max_history=max_history,
        seed=seed,
        skip_bad_rows=skip_bad_rows,
        mirror=mirror,
        progress=True,
        log=lambda msg: console.print(msg, markup=False),
    )
    print_card(read_meta(folder), folder, console)
