"""The `sparcode` console script: registers the commands and turns user errors into exit code 2."""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console
from rich.markup import escape

from sparcode_cli import __version__
from sparcode_cli.errors import UserError

err_console = Console(stderr=True, soft_wrap=True)

app = typer.Typer(
    name="sparcode",
    help=(
        "Candidate matching experiments: SparCode's sparse code->item index against two-tower + Faiss.\n\n"
        "Example: sparcode train --dataset movielens && sparcode index runs/<run-id> --out out/ "
        "&& sparcode eval --index out/"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        print(f"sparcode {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show version."),
) -> None:
    """sparcode: download, preprocess, train, index, eval."""


def _register() -> None:
    # Command modules import their heavy dependencies lazily, so `--help` stays fast.
    from sparcode_cli.commands import registered

    for fn, name in registered():
        app.command(name=name)(fn)


_register()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    rank = _join_torchrun()
    try:
        app(args=args, prog_name="sparcode")
    except UserError as exc:
        if debug:
            raise
        err_console.print(f"[bold red]{escape(rank)}error:[/] ", end="")
        err_console.print(exc.message, highlight=False, markup=False)
        if exc.hint:
            err_console.print(exc.hint, highlight=False, markup=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    finally:
        if rank:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _join_torchrun() -> str:
    """Under torchrun (several processes): join the process group; "[rank r] " to prefix errors, else ""."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return ""  # one process: torch.distributed is not even imported
    from sparcode_cli import distributed

    distributed.init_from_env()
    return f"[rank {distributed.rank()}] "
