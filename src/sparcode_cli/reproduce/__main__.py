"""`python -m sparcode_cli.reproduce`: the command behind `make reproduce` / `make reproduce-full`."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from sparcode_cli.errors import UserError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def reproduce(
    matrix: str = typer.Option(
        "reproduce", "--matrix", "-m", help="Matrix of the config: reproduce | reproduce-full."
    ),
    datasets: str = typer.Option(
        "", "--datasets", help="Comma-separated datasets (names or CSV files); replaces the matrix's list."
    ),
    mirror: str = typer.Option(
        None, "--mirror", envvar="SPARCODE_MIRROR", help="Mirror (folder or URL) for raw data."
    ),
    config: Path = typer.Option(
        None, "--config", help="Reproduce config (default experiments/reproduce.toml)."
    ),
    jobs: int = typer.Option(None, "--jobs", "-j", help="Training runs in parallel (settings.jobs)."),
    train_threads: int = typer.Option(None, "--train-threads", help="Torch threads per training run."),
    eval_threads: int = typer.Option(None, "--eval-threads", help="Threads for evaluation (QPS also at 1)."),
    out: Path = typer.Option(None, "--out", help="Run folders (settings.out)."),
    results: Path = typer.Option(None, "--results", help="Reports and PNGs (settings.results)."),
    report_only: bool = typer.Option(
        False, "--report-only", help="Rebuild the reports from cached cells only."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the training runs and cells; run nothing."),
) -> None:
    """Train, index, evaluate and report the matrix; finished runs and cells are reused.

    Example: python -m sparcode_cli.reproduce --matrix reproduce-full --datasets movielens,gowalla --mirror ../shared/data
    """
    from sparcode_cli.reproduce.matrix import expand
    from sparcode_cli.reproduce.runner import run_plan

    names = [d.strip() for d in datasets.split(",") if d.strip()] or None
    plan = expand(matrix, datasets=names, config=config)
    for key, value in (
        ("jobs", jobs),
        ("train_threads", train_threads),
        ("eval_threads", eval_threads),
        ("out", out),
        ("results", results),
    ):
        if value is not None:
            plan.settings[key] = str(value) if isinstance(value, Path) else value
    console = Console(stderr=True, soft_wrap=True)
    if dry_run:
        console.print(f"{plan.matrix}: {len(plan.trains)} training runs, {len(plan.evals)} cells")
        for t in plan.trains:
            console.print(
                f"  train {t.key}" + (f"  (warm start from {t.init_from.key})" if t.init_from else "")
            )
        for e in plan.evals:
            console.print(f"  eval  {e.train.key} -> {e.table}:{e.key} ({e.users} users)")
        return
    outcome = run_plan(plan, mirror=mirror, console=console, report_only=report_only)
    for p in outcome.reports:
        console.print(f"wrote {p}")
    console.print(f"{plan.matrix}: {outcome.wall_s / 60:.1f} min wall")
    if outcome.failures:
        console.print(f"[bold red]{len(outcome.failures)} failure(s)[/]:")
        for f in outcome.failures:
            console.print(f"  {f}", highlight=False, markup=False)
        raise typer.Exit(1)


def main() -> None:
    try:
        app(prog_name="python -m sparcode_cli.reproduce")
    except UserError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted: run the same command again to continue")
        sys.exit(130)


if __name__ == "__main__":
    main()
