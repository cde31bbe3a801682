"""What the prototype scripts that patch SparCode's training from outside the package share
(train_probes_probe.py, a2a_teacher_probe.py): a worker process that runs `sparcode train` with the patch applied,
runs kept apart by a marker file, and the table against the default runs and the two-tower.

Import it after putting this folder on `sys.path` (it imports sparcode_ablation.py). The patched runs have the
default config's run ids (and its code digest in meta.json), so they go to a folder of
their own, and only a finished run whose marker matches is reused.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from sparcode_ablation import (
    best,
    chosen_seeds,
    compare,
    default_runs,
    default_sets,
    expected_id,
    two_tower_runs,
)

from sparcode_cli.training.trainer import run_state

METRICS = ("valid", "valid50", "recall@20", "recall@50")


def worker(patch: Callable[[], None]) -> bool:
    """In a worker (`<script> --one -- <sparcode args>`): apply the patch, run the CLI, return True."""
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        from sparcode_cli.commands.app import main as cli

        patch()
        cli(sys.argv[3:])
        return True
    return False


def train_patched(
    script: str,
    tt: Path,
    sets: list[str],
    dataset: str,
    out: Path,
    marker: str,
    tag: str,
    env: dict[str, str],
) -> Path:
    """SparCode trained from two-tower run `tt` by `script`'s worker, its marker file holding `tag`."""
    rid = expected_id(tt, sets, dataset)
    mark = out / rid / marker
    if mark.is_file() and mark.read_text().strip() == tag and run_state(out / rid) == "finished":
        return out / rid  # this script's finished run, with this tag, by this code
    if (out / rid).exists():
        raise SystemExit(f"{out / rid} exists and is not this script's finished run ({tag}): use a new --out")
    cmd = [sys.executable, script, "--one", "--", "train", "--dataset", dataset, "--model", "sparcode",
           "--init-from", str(tt), "--out", str(out), *(a for s in sets for a in ("--set", s)), "--no-progress"]  # fmt: skip
    full_env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **env)
    r = subprocess.run(cmd, capture_output=True, text=True, env=full_env)
    if r.returncode != 0 or not (out / rid / "results.json").is_file():
        raise SystemExit(f"failed (rc {r.returncode}, run {rid}): {' '.join(cmd)}\n{r.stderr[-2000:]}")
    mark.write_text(f"{tag}\n")
    return out / rid


def parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every such script takes; it adds its own."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--runs", required=True, type=Path, help="the target matrix's runs")
    ap.add_argument("--dataset", default="movielens-100k")
    ap.add_argument("--encoder", default="dnn")
    ap.add_argument("--out", required=True, type=Path, help="a folder for the patched runs only")
    ap.add_argument("--seeds", help="comma-separated subset of the seeds (default: all)")
    ap.add_argument("--jobs", type=int, default=2)
    return ap


def train_all(
    script: str,
    a: argparse.Namespace,
    marker: str,
    tag_env: Callable[[int, Path], tuple[str, dict[str, str]]],
) -> tuple[dict[int, Path], list[int], list[Path], list[Path]]:
    """For each chosen seed's two-tower run: the patched SparCode run (`tag_env(seed, two-tower run)` gives its
    marker text and the worker's environment) and the default SparCode run of --runs it is compared with.
    Returns the two-tower runs by seed, the seeds, the patched runs and the default runs."""
    tts = two_tower_runs(a.runs, a.dataset, a.encoder)
    seeds = chosen_seeds(tts, a.seeds, a.runs, a.encoder)
    a.out.mkdir(parents=True, exist_ok=True)
    sets = {s: default_sets(s, a.encoder, a.dataset) for s in seeds}
    with ThreadPoolExecutor(a.jobs) as pool:
        fut = {
            s: pool.submit(
                train_patched, script, tts[s], sets[s], a.dataset, a.out, marker, *tag_env(s, tts[s])
            )
            for s in seeds
        }
        new = [fut[s].result() for s in seeds]
    return tts, seeds, new, default_runs(a.runs, tts, seeds, a.encoder, a.dataset)


def report(
    first: str,
    rows: list[tuple[str, list[Path]]],
    against: list[tuple[str, list[Path]]],
    seeds: list[int],
    also: list[tuple[str, list[Path]]] | None = None,
) -> None:
    """A markdown table: per row of (label, runs per seed) the best epochs, mean validation and test Recall, and a
    paired bootstrap of test Recall@20 / @50 against the first row and against each of `against`; then each
    seed's numbers, for the rows and for the runs of `also` (shown, not compared)."""
    heads = [f"vs {rows[0][0]}"] + [f"vs {name}" for name, _ in against]
    print(f"| {first} | best epoch per seed | valid R@20 | valid R@50 | test R@20 | test R@50 | "
          + " | ".join(f"{h}: ΔR@20 / ΔR@50" for h in heads) + " |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|" + "---|" * len(heads))
    ref = rows[0][1]
    for label, runs in rows:
        b = [best(r) for r in runs]
        ms = " | ".join(f"{np.mean([x[k] for x in b]):.4f}" for k in METRICS)
        cmp = ["–" if runs is ref else " / ".join(compare(runs, ref, m) for m in ("recall@20", "recall@50"))]
        cmp += [
            " / ".join(compare(runs, other, m) for m in ("recall@20", "recall@50")) for _, other in against
        ]
        ep = ", ".join(str(int(x["epoch"])) for x in b)
        print(f"| {label} | {ep} | {ms} | " + " | ".join(cmp) + " |")
    print("\nPer seed (valid R@20 / valid R@50 / test R@20 / test R@50):")
    for label, runs in [*rows, *(also or [])]:
        cells = [" / ".join(f"{best(r)[k]:.4f}" for k in METRICS) for r in runs]
        print(f"- {label}: " + "; ".join(f"seed {s}: {c}" for s, c in zip(seeds, cells, strict=True)))
