"""SparCode with and without `model.distill` (models/teacher.py), one weight at a time, on every seed of a
dataset's two-tower runs: the ablation table of experiments/results/movielens-100k-distill.md.

For each two-tower run (`dnn` by default) found in --runs, trains SparCode from it with the target matrix's
budget (400 steps, `train.epochs=1000`, the two-tower's seed, one code per token: `model.probes=1`, as when the
table was made) and `model.distill=w` for each weight, into
--out (a new or empty folder: `sparcode train` stops on a run that already exists there), then prints per seed and as a mean over
seeds: validation Recall@20 (the selection metric) and its best epoch, test Recall@20 / @50, and a paired
bootstrap over test users (3 seeds together) against weight 0 and against the two-tower.

    SPARCODE_HOME=<home> .venv/bin/python experiments/scripts/distill_ablation.py \
        --runs <the target matrix's runs> --dataset movielens-100k --out <folder> --weights 0,3,10,30
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np

from sparcode_cli.bootstrap import align_users, paired_bootstrap

SPARCODE = str(Path(sys.executable).parent / "sparcode")


def two_tower_runs(runs: Path, dataset: str, encoder: str) -> dict[int, Path]:
    """seed -> the matrix's two-tower run (the target budget: 1000 steps) for this dataset and encoder."""
    out: dict[int, Path] = {}
    for meta_path in sorted(runs.glob(f"two-tower-{dataset}-*/meta.json")):
        meta = json.loads(meta_path.read_text())
        cfg = tomllib.loads((meta_path.parent / "config.toml").read_text())
        if cfg["model"].get("query_encoder") == encoder and cfg["train"].get("max_steps") == 1000:
            out[int(meta["seed"])] = meta_path.parent
    return out


def train(tt: Path, seed: int, dataset: str, weight: float, out: Path) -> Path:
    # model.probes=1: the committed table predates multi-probe serving
    cmd = [SPARCODE, "train", "--dataset", dataset, "--model", "sparcode", "--init-from", str(tt), "--out", str(out),
           "--set", f"train.seed={seed}", "--set", "train.epochs=1000", "--set", "train.max_steps=400",
           "--set", "train.threads=1", "--set", f"model.distill={weight}", "--set", "model.probes=1",
           "--no-progress"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")
    ids = re.findall(rf"(sparcode-{re.escape(dataset)}-[0-9a-f]{{8}})", p.stdout + p.stderr)
    if not ids:
        raise SystemExit(f"no run id in the output of {' '.join(cmd)}")
    return out / ids[-1]


def best(run: Path) -> dict[str, float]:
    """The served checkpoint: its epoch, validation Recall@20 (what selected it) and test Recall@20 / @50."""
    res = json.loads((run / "results.json").read_text())
    return {"epoch": res["best_epoch"], "valid": res["valid"]["recall@20"],
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
    p.add_argument("--weights", default="0,3,10,30")
    a = p.parse_args()
    tts = two_tower_runs(a.runs, a.dataset, a.encoder)
    if not tts:
        raise SystemExit(f"no {a.encoder} two-tower run of {a.dataset} in {a.runs}")
    weights = [float(w) for w in a.weights.split(",")]
    seeds = sorted(tts)
    runs = {w: [train(tts[s], s, a.dataset, w, a.out) for s in seeds] for w in weights}
    print(
        f"{a.dataset}, {a.encoder}, seeds {seeds}; two-tower runs: {', '.join(tts[s].name for s in seeds)}\n"
    )
    print(
        "| model.distill | best epoch per seed | valid R@20 | test R@20 | test R@50 | vs distill 0: ΔR@20 / ΔR@50 | vs two-tower: ΔR@20 / ΔR@50 |"
    )
    print("|---|---|---:|---:|---:|---|---|")
    tt_rows = {s: best(tts[s]) for s in seeds}
    for w in weights:
        rows = [best(r) for r in runs[w]]

        def ms(key: str, rows: list[dict[str, float]] = rows) -> str:
            v = [r[key] for r in rows]
            return f"{np.mean(v):.4f} ± {np.std(v):.4f}"

        vs0 = (
            "–"
            if w == weights[0]
            else " / ".join(compare(runs[w], runs[weights[0]], m) for m in ("recall@20", "recall@50"))
        )
        vs_tt = " / ".join(compare(runs[w], [tts[s] for s in seeds], m) for m in ("recall@20", "recall@50"))
        epochs = ", ".join(str(int(r["epoch"])) for r in rows)
        print(
            f"| {w:g} | {epochs} | {ms('valid')} | {ms('recall@20')} | {ms('recall@50')} | {vs0} | {vs_tt} |"
        )
    tr = list(tt_rows.values())
    print(f"| two-tower | | {np.mean([r['valid'] for r in tr]):.4f} | {np.mean([r['recall@20'] for r in tr]):.4f} | "
          f"{np.mean([r['recall@50'] for r in tr]):.4f} | | |")  # fmt: skip
    print("\nPer seed (valid R@20 / test R@20 / test R@50):")
    for w in weights:
        cells = [
            f"{r['valid']:.4f} / {r['recall@20']:.4f} / {r['recall@50']:.4f}" for r in map(best, runs[w])
        ]
        print(f"- distill {w:g}: " + "; ".join(f"seed {s}: {c}" for s, c in zip(seeds, cells, strict=True)))


if __name__ == "__main__":
    main()
