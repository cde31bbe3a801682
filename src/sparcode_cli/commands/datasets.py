"""`sparcode datasets`: list the dataset registry (thin wrapper)."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

WIDE = 140  # below this terminal width the license column shows only its first clause


def datasets() -> None:
    """List the datasets sparcode knows: name (aliases), title, source, size, license, cached here or not.

    Example: sparcode datasets   (COLUMNS=160 sparcode datasets shows the full license notes)
    """
    from sparcode_cli.data.download import listing
    from sparcode_cli.paths import sparcode_home

    console = Console()
    wide = console.width >= WIDE
    table = Table(title="sparcode datasets", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("name", style="bold", min_width=14)
    table.add_column("title")
    table.add_column("source")
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("license")
    table.add_column("cached", no_wrap=True)
    for row in listing():
        name = row.name + (f"\n[dim]{', '.join(row.aliases)}[/]" if row.aliases else "")
        license_ = row.license if wide else row.license.split(":")[0].split(";")[0]
        cached = "[green]yes[/]" if row.cached else "no"
        table.add_row(name, row.title, row.source, row.size, license_, cached)
    console.print(table)
    console.print(
        f"cache: {sparcode_home()}   get one: sparcode download NAME [--mirror URL|DIR]", markup=False
    )
