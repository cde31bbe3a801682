"""`sparcode train`: prepare the dataset, train a model into runs/<run-id>/, print validation and test metrics."""

from __future__ import annotations

from pathlib import Path

import typer

from sparcode_cli.errors import UserError


def train(
    dataset: str = typer.Option(
        ...,
        "--dataset",
        "-d",
        help="Registered dataset name (see `sparcode datasets`) "
        "or a CSV/Parquet file with user,item[,timestamp][,rating] columns.",
    ),
    model: str = typer.Option(
        None,
        "--model",
        "-m",
        show_default=False,
        help="popularity | two-tower | sparcode | all-to-all (default: the --config "
        "file's model.name, else sparcode)",
    ),
    config: Path = typer.Option(None, "--config", "-c", help="TOML file over experiments/<model>.toml."),
    set_: list[str] = typer.Option(
        None,
        "--set",
        "-s",
        help="Override one key, e.g. --set train.lr=0.003 "
        "(repeatable). Unknown keys are an error that lists the valid ones.",
    ),
    out: Path = typer.Option(Path("runs"), "--out", "-o", help="Runs folder: the run goes to OUT/<run-id>/."),
    resume: bool = typer.Option(False, "--resume", help="Continue OUT/<run-id>/checkpoint_last.pt exactly."),
    max_steps: int = typer.Option(
        None,
        "--max-steps",
        min=0,
        show_default=False,
        help="Stop once the run has done N optimiser steps in total (checkpoint kept; "
        "--resume continues). Not part of the run id; for a step budget use "
        "--set train.max_steps=N.",
    ),
    init_from: Path = typer.Option(
        None, "--init-from", help="Warm start from a run folder (sparcode: a two-tower run)."
    ),
    mirror: str = typer.Option(
        None,
        "--mirror",
        envvar="SPARCODE_MIRROR",
        help="HTTP base URL or local folder replacing the official download host.",
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="No live progress display."),
    nproc: int = typer.Option(
        None,
        "--nproc",
        min=1,
        show_default=False,
        help="Data-parallel training on N processes of this machine: starts `torchrun --standalone "
        "--nproc-per-node N -m sparcode_cli train ...` (the same as running that yourself).",
    ),
) -> None:
    """Train a model and evaluate its best checkpoint on validation and test (full ranking).

    Example: sparcode train --dataset movielens --model two-tower --set train.epochs=10
    """
    if nproc is not None and nproc > 1:
        args = ["--dataset", dataset, "--out", str(out)]
        args += ["--model", model] if model else []
        args += ["--config", str(config)] if config else []
        args += [a for v in set_ or [] for a in ("--set", v)]
        args += ["--resume"] if resume else []
        args += ["--max-steps", str(max_steps)] if max_steps is not None else []
        args += ["--init-from", str(init_from)] if init_from else []
        args += ["--mirror", mirror] if mirror else []
        args += ["--no-progress"] if no_progress else []
        raise typer.Exit(launch(nproc, ["train", *args]))

    from rich.console import Console
    from rich.table import Table

    from sparcode_cli import distributed as dd
    from sparcode_cli.config import load_config, nullable
    from sparcode_cli.data.preprocess import prepare
    from sparcode_cli.data.store import load_dataset
    from sparcode_cli.training.trainer import train as run_training

    console = Console(stderr=True)
    cfg = load_config(model, config, list(set_ or []))
    dc = cfg["data"]
    if not (init_from is None or init_from.exists()):
        raise UserError(
            f"--init-from {init_from} does not exist", hint="give a run folder from `sparcode train`"
        )
    with dd.main_first():  # rank 0 downloads and preprocesses; the others then find it in the cache
        folder = prepare(
            dataset,
            split=nullable(dc["split"]),
            min_count=nullable(dc["min_count"]),
            rating_threshold=nullable(dc["rating_threshold"]),
            max_history=int(dc["max_history"]),
            seed=int(dc["seed"]),
            mirror=mirror,
            progress=not no_progress and dd.is_main(),
        )
    ds = load_dataset(folder)
    result = run_training(
        ds,
        cfg,
        out,
        resume=resume,
        stop_at_step=max_steps,
        init_from=init_from,
        console=console,
        progress=not no_progress,
    )
    if not dd.is_main():
        return
    if result.status == "interrupted":
        console.print(f"interrupted: {result.run_dir}/checkpoint_last.pt saved; continue with --resume")
        raise typer.Exit(130)

    table = Table(title=f"{result.run_id}  ({result.status}, best epoch {result.best_epoch})")
    table.add_column("split")
    keys = ("recall@20", "ndcg@20", "recall@50", "ndcg@50", "hitrate@20", "precision@20")
    for k in keys:
        table.add_column(k, justify="right")
    for split, summary in (("valid", result.valid), ("test", result.test)):
        if summary:
            table.add_row(split, *(f"{summary[k]:.4f}" for k in keys))
    Console().print(table)
    console.print(
        f"run folder {result.run_dir}  ({result.steps} steps, {result.train_time_s:.1f} s training, "
        f"{result.samples_per_s:,.0f} samples/s)"
    )


def launch(nproc: int, argv: list[str]) -> int:
    """`torchrun --standalone --nproc-per-node nproc -m sparcode_cli ARGV`, through torchrun's own launcher
    (torch.distributed.launcher), in this Python. Returns 2 when a rank failed on a user error (which it has
    printed), another failed rank's exit code, else 0."""
    import os
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from sparcode_cli import distributed as dd

    if dd.launched():
        raise UserError("--nproc inside a torchrun job: torchrun has started the processes already")
    os.environ.setdefault(
        "OMP_NUM_THREADS", "1"
    )  # torchrun's default, without its warning; train.threads sets more
    config = (
        LaunchConfig(  # what `torchrun --standalone` sets up: one node, a rendezvous on a free local port
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            run_id=str(uuid.uuid4()),
            rdzv_backend="c10d",
            rdzv_endpoint="localhost:0",
            max_restarts=0,
        )
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "sparcode_cli", *argv)
    except ChildFailedError as exc:
        codes = sorted(
            f.exitcode for f in exc.failures.values() if f.exitcode > 0
        )  # < 0: stopped by a signal
        return 2 if 2 in codes else (codes[0] if codes else 1)
    return 0
