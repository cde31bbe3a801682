"""SparCode with one config key changed, one value at a time, on every seed of a dataset's two-tower runs: the
3-seed ablation tables of experiments/results/ (movielens-100k-distill.md, movielens-100k-after-probes.md).

For each two-tower run of --encoder found in --runs (the target matrix's two-tower budget for --dataset), trains
SparCode from it with the target matrix's overrides for --dataset (experiments/reproduce.toml `[target]`: its
budget, 400 steps and `train.epochs=1000`, and the dataset's recipe, e.g. Gowalla's flat codebook; the
two-tower's seed) and `--key=value` for each of --values, plus the `--set` overrides, into --out. A run that already finished with
this code (same run id, same code digest) in --out or in --runs is reused, not retrained, so the reference value
can be the target matrix's own SparCode run. Prints per value a mean over seeds: validation Recall@20 (the
selection metric) and Recall@50, the best epoch per seed, test Recall@20 / @50, and a paired bootstrap over test
users (the chosen seeds together) against the first value and against the two-tower; then each seed's numbers.

    SPARCODE_HOME=<home> .venv/bin/python experiments/scripts/sparcode_ablation.py \\
        --runs <the target matrix's runs> --dataset movielens-100k --encoder dnn --seeds 0,1,2 --out <folder> \\
        --key model.distill --values 0,3,10,30 --set model.probes=1
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from sparcode_cli.bootstrap import align_users, paired_bootstrap
from sparcode_cli.config import load_config, run_id
from sparcode_cli.reproduce.matrix import expand
from sparcode_cli.training.trainer import run_state

SPARCODE = str(Path(sys.executable).parent / "sparcode")


@functools.cache
def _target_spec(dataset: str) -> dict[str, Any]:
    """The target matrix of reproduce.toml, resolved for `dataset` (read once per dataset)."""
    return expand("target", datasets=[dataset]).spec


def target_budget(dataset: str, model: str) -> int:
    """The target matrix's train.max_steps of `model` on `dataset`."""
    spec = _target_spec(dataset)
    return int({**spec.get("max_steps", {}), **spec["dataset_max_steps"].get(dataset, {})}[model])


def target_sets(dataset: str, model: str) -> list[str]:
    """The target matrix's overrides of `model` on `dataset` (reproduce.toml), less the seed and the encoder."""
    spec = _target_spec(dataset)
    return [*spec.get("set", []), *spec.get("model_set", {}).get(model, []),
            *spec["dataset_set"].get(dataset, {}).get(model, []),
            f"train.max_steps={target_budget(dataset, model)}"]  # fmt: skip


def two_tower_runs(runs: Path, dataset: str, encoder: str) -> dict[int, Path]:
    """seed -> the matrix's two-tower run (the target matrix's budget) for this dataset and encoder."""
    steps = target_budget(dataset, "two-tower")
    out: dict[int, Path] = {}
    for meta_path in sorted(runs.glob(f"two-tower-{dataset}-*/meta.json")):
        meta = json.loads(meta_path.read_text())
        cfg = tomllib.loads((meta_path.parent / "config.toml").read_text())
        if (
            meta["dataset"] == dataset  # the glob of "movielens" also matches movielens-100k's runs
            and cfg["model"].get("query_encoder") == encoder
            and cfg["train"].get("max_steps") == steps
        ):
            seed = int(meta["seed"])
            if seed in out:
                raise SystemExit(
                    f"two {encoder} two-tower runs of seed {seed} in {runs}: {out[seed].name}, "
                    f"{meta_path.parent.name}; give a runs folder with the target matrix's runs only"
                )
            out[seed] = meta_path.parent
    return out


def chosen_seeds(tts: dict[int, Path], seeds: str | None, runs: Path, encoder: str) -> list[int]:
    """--seeds (comma-separated) or every seed found; each must have a two-tower run."""
    chosen = sorted(tts) if seeds is None else [int(s) for s in seeds.split(",")]
    if not chosen or (missing := [s for s in chosen if s not in tts]):
        raise SystemExit(f"no {encoder} two-tower run of seed(s) {missing if chosen else 'any'} in {runs}")
    return chosen


def default_sets(seed: int, encoder: str, dataset: str) -> list[str]:
    """The overrides of the target matrix's SparCode run of this seed on `dataset`, at 1 torch thread."""
    return [*target_sets(dataset, "sparcode"), f"train.seed={seed}", "train.threads=1",
            f"model.query_encoder={encoder}"]  # fmt: skip


def overrides(seed: int, encoder: str, dataset: str, key: str, value: str, extra: list[str]) -> list[str]:
    return [*default_sets(seed, encoder, dataset), *extra, f"{key}={value}"]


def expected_id(tt: Path, sets: list[str], dataset: str) -> str:
    """The run id `sparcode train --init-from tt` gives (training/trainer.py: the warm start is in the id)."""
    meta = json.loads((tt / "meta.json").read_text())
    return run_id(load_config("sparcode", None, sets), dataset, f"{meta['data_hash']}|init={meta['run_id']}")


def default_runs(
    runs: Path, tts: dict[int, Path], seeds: list[int], encoder: str, dataset: str
) -> list[Path]:
    """The target matrix's default SparCode run of each seed in `runs`, found by its run id; finished by this code."""
    found = [runs / expected_id(tts[s], default_sets(s, encoder, dataset), dataset) for s in seeds]
    if stale := [r.name for r in found if run_state(r) != "finished"]:
        raise SystemExit(f"no finished default SparCode run of this code in {runs}: {', '.join(stale)}")
    return found


def train(tt: Path, sets: list[str], dataset: str, out: Path, reuse: list[Path]) -> Path:
    rid = expected_id(tt, sets, dataset)
    for folder in (out, *reuse):
        if run_state(folder / rid) == "finished":
            return folder / rid
    cmd = [SPARCODE, "train", "--dataset", dataset, "--model", "sparcode", "--init-from", str(tt), "--out", str(out),
           *(a for s in sets for a in ("--set", s)), "--no-progress"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0 or run_state(out / rid) != "finished":
        raise SystemExit(
            f"failed (rc {p.returncode}, expected run {rid}): {' '.join(cmd)}\n{p.stderr[-2000:]}"
        )
    return out / rid


def best(run: Path) -> dict[str, float]:
    """The served checkpoint: its epoch, validation Recall@20 (what selected it) / @50, test Recall@20 / @50."""
    res = json.loads((run / "results.json").read_text())
    return {"epoch": res["best_epoch"], "valid": res["valid"]["recall@20"], "valid50": res["valid"]["recall@50"],
            **{k: res["test"][k] for k in ("recall@20", "recall@50")}}  # fmt: skip


def per_user(run: Path, metric: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(run / "results_per_user.npz") as z:
        return np.asarray(z["test.users"]), np.asarray(z[f"test.{metric}"], dtype=np.float64)


def compare(a_runs: list[Path], b_runs: list[Path], metric: str) -> str:
    """Paired bootstrap of a - b over test users, the seeds' values averaged per user."""
    a, b = [], []
    for ra, rb in zip(a_runs, b_runs, strict=True):
        (ua, va), (ub, vb) = per_user(ra, metric), per_user(rb, metric)
        _, xa, xb = align_users(ua, va, ub, vb)
        a.append(xa)
        b.append(xb)
    r = paired_bootstrap(np.stack(a), np.stack(b), n_boot=2000, seed=0)
    return f"{r.diff:+.4f} [{r.low:+.4f}, {r.high:+.4f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--runs", required=True, type=Path, help="a runs folder with the target matrix's two-tower runs"
    )
    p.add_argument("--dataset", default="movielens-100k")
    p.add_argument("--encoder", default="dnn")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--key", required=True, help="the config key to vary, e.g. model.distill")
    p.add_argument("--values", required=True, help="comma-separated; the first is the reference")
    p.add_argument("--set", action="append", default=[], help="an override for every run (repeatable)")
    p.add_argument("--seeds", help="comma-separated subset of the two-tower runs' seeds (default: all)")
    p.add_argument("--jobs", type=int, default=2, help="training runs at once (1 thread each)")
    a = p.parse_args()
    tts = two_tower_runs(a.runs, a.dataset, a.encoder)
    if not tts:
        raise SystemExit(f"no {a.encoder} two-tower run of {a.dataset} in {a.runs}")
    values = a.values.split(",")
    seeds = chosen_seeds(tts, a.seeds, a.runs, a.encoder)
    a.out.mkdir(parents=True, exist_ok=True)
    jobs = {(v, s): overrides(s, a.encoder, a.dataset, a.key, v, a.set) for v in values for s in seeds}
    with ThreadPoolExecutor(a.jobs) as pool:
        futures = {
            k: pool.submit(train, tts[k[1]], sets, a.dataset, a.out, [a.runs]) for k, sets in jobs.items()
        }
        runs = {v: [futures[v, s].result() for s in seeds] for v in values}
    print(f"{a.dataset}, {a.encoder}, seeds {seeds}; two-tower runs: {', '.join(tts[s].name for s in seeds)}")
    print(f"every run: {' '.join(target_sets(a.dataset, 'sparcode') + a.set)}\n")
    print(
        f"| {a.key} | best epoch per seed | valid R@20 | valid R@50 | test R@20 | test R@50 | "
        f"vs {values[0]}: ΔR@20 / ΔR@50 | vs two-tower: ΔR@20 / ΔR@50 |"
    )
    print("|---|---|---:|---:|---:|---:|---|---|")

    def ms(rows: list[dict[str, float]], key: str) -> str:
        v = [r[key] for r in rows]
        return f"{np.mean(v):.4f} ± {np.std(v, ddof=1) if len(v) > 1 else 0.0:.4f}"

    for v in values:
        rows = [best(r) for r in runs[v]]
        vs0 = (
            "–"
            if v == values[0]
            else " / ".join(compare(runs[v], runs[values[0]], m) for m in ("recall@20", "recall@50"))
        )
        vs_tt = " / ".join(compare(runs[v], [tts[s] for s in seeds], m) for m in ("recall@20", "recall@50"))
        epochs = ", ".join(str(int(r["epoch"])) for r in rows)
        print(f"| {v} | {epochs} | {ms(rows, 'valid')} | {ms(rows, 'valid50')} | {ms(rows, 'recall@20')} | "
              f"{ms(rows, 'recall@50')} | {vs0} | {vs_tt} |")  # fmt: skip
    tr = [best(tts[s]) for s in seeds]
    print(
        f"| two-tower | | {ms(tr, 'valid')} | {ms(tr, 'valid50')} | {ms(tr, 'recall@20')} | {ms(tr, 'recall@50')} | | |"
    )
    print("\nPer seed (valid R@20 / valid R@50 / test R@20 / test R@50; run):")
    for v in values:
        cells = [
            f"{r['valid']:.4f} / {r['valid50']:.4f} / {r['recall@20']:.4f} / {r['recall@50']:.4f}"
            for r in map(best, runs[v])
        ]
        print(
            f"- {a.key}={v}: "
            + "; ".join(f"seed {s}: {c} (`{r.name}`)" for s, c, r in zip(seeds, cells, runs[v], strict=True))
        )


if __name__ == "__main__":
    main()
