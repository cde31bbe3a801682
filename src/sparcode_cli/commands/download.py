"""`sparcode download NAME`: fetch a dataset's raw files into the cache and verify them (thin wrapper)."""

from __future__ import annotations

import typer
from rich.console import Console


def download(
    name: str = typer.Argument(..., metavar="NAME", help="Dataset name or alias (see `sparcode datasets`)."),
    mirror: str | None = typer.Option(
        None,
        "--mirror",
        metavar="URL|DIR",
        help="Fetch from here instead of the official host: an HTTP base URL, or a local folder holding the "
        "archive or the extracted files (directly or in a sub-folder named for the dataset). "
        "Default: $SPARCODE_MIRROR. Checksums still decide.",
    ),
    force: bool = typer.Option(False, "--force", help="Fetch again even if a verified copy is cached."),
) -> None:
    """Download a dataset into the cache ($SPARCODE_HOME/raw/NAME) and verify its checksums.

    Example: sparcode download movielens-100k --mirror /data/ml-100k
    """
    from sparcode_cli.data.download import cached_raw, ensure_raw
    from sparcode_cli.data.registry import get_spec

    console = Console(highlight=False)
    spec = get_spec(name)
    if not force and spec.source != "embedded":
        hit = cached_raw(spec)
        if hit is not None:
            console.print(
                f"{spec.name}: already cached and verified in {hit.path} (use --force to fetch again)",
                markup=False,
            )
            return
    raw = ensure_raw(spec, mirror=mirror, force=force, progress=True)
    how = {
        "embedded": "shipped with sparcode (embedded), nothing to download",
        "cache": "restored from the verified archive in the cache",
        "download": "downloaded",
        "mirror": "copied from the mirror",
    }.get(raw.source, raw.source)
    console.print(
        f"{spec.name}: {how}; {len(raw.checksums)} files verified (md5) in {raw.path}", markup=False
    )
