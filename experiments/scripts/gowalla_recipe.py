"""Issue #12: the Gowalla two-tower recipe, one change at a time from it, same seed, same data, same budget.

    .venv/bin/python experiments/scripts/gowalla_recipe.py --runs RUNS --mirror ../shared/data \
        [--home HOME] [--epochs 4] [--jobs 2] > experiments/results/gowalla-two-tower-recipe.md

Every variant is a normal `sparcode train` run (two-tower, dnn) under RUNS: a finished run of this code is
reused, a stale one set aside, a partial one resumed. Each trains at 1 torch thread, `--jobs` at a time, for at
most `--epochs` epochs of the variant's own batch size (early stopping on validation Recall@20, patience 3),
then the best checkpoint is evaluated on test (full ranking, training and validation items masked). Prints the
ablation table and every variant's learning curve (validation Recall@20 per epoch) as markdown.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

# The recipe (the first row); every other row changes one thing.
RECIPE = [
    "model.user_id=true",
    "model.hidden=0",
    "model.dropout=0.0",
    "model.temperature=0.1",
    "train.negatives=uniform",
    "train.n_negatives=1024",
    "train.batch_size=1024",
]
VARIANTS: list[tuple[str, list[str]]] = [
    ("recipe", []),
    ("no user-ID embedding", ["model.user_id=false"]),
    ("MLP towers (hidden 128)", ["model.hidden=128"]),
    ("temperature 0.05", ["model.temperature=0.05"]),
    ("256 uniform negatives", ["train.n_negatives=256"]),
    (
        "default negatives (mixed 256, logQ) and batch 512",
        ["train.negatives=mixed", "train.n_negatives=256", "train.batch_size=512"],
    ),  # fmt: skip
    # no linear map in either tower: query = user-ID embedding + mean history embedding, item = its id embedding
    ("embedding towers (no maps)", ["model.tower=embedding"]),
    # from the embedding towers, one more change each
    ("embedding towers, no user-ID embedding", ["model.tower=embedding", "model.user_id=false"]),
    ("embedding towers, lr 0.003", ["model.tower=embedding", "train.lr=0.003"]),
    ("embedding towers, dim 128", ["model.tower=embedding", "model.emb_dim=128", "model.dim=128"]),
    ("embedding towers, no history (MF)", ["model.tower=embedding", "model.history=false"]),
    # from the dim-128 embedding towers (the recipe since session 10), one more change
    (
        "embedding towers, dim 128, weight decay 0.1",
        ["model.tower=embedding", "model.emb_dim=128", "model.dim=128", "train.weight_decay=0.1"],
    ),  # fmt: skip
    ("embedding towers, dim 256", ["model.tower=embedding", "model.emb_dim=256", "model.dim=256"]),
]
BARS_YOUTUBEDNN = (0.1754, 0.1473)


def overrides(changes: list[str], epochs: int, seed: int = 0) -> list[str]:
    keys = {c.split("=", 1)[0] for c in changes}
    seed_set = [f"train.seed={seed}"] if seed else []  # seed 0 is the default: left out, so run ids stay
    return [*(r for r in RECIPE if r.split("=", 1)[0] not in keys), *changes, f"train.epochs={epochs}",
            *seed_set, "train.threads=1", "train.eval_batch_size=2048"]  # fmt: skip


def run_variant(args: tuple[str, list[str], str, str]) -> dict[str, Any]:
    name, ov, runs, data = args
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    import torch
    from rich.console import Console

    from sparcode_cli.config import load_config, run_id
    from sparcode_cli.data.store import load_dataset
    from sparcode_cli.training.trainer import run_state, set_aside, train

    torch.set_num_threads(1)
    ds = load_dataset(data)
    cfg = load_config("two-tower", overrides=ov)
    run_dir = Path(runs) / run_id(cfg, ds.name, ds.data_hash)
    state = run_state(run_dir)
    if state == "stale":
        set_aside(run_dir)
    if state != "finished":
        train(ds, cfg, runs, console=Console(file=io.StringIO()), progress=False, resume=state == "partial")
    res = json.loads((run_dir / "results.json").read_text())
    curve = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"name": name, "overrides": ov, "run_id": run_dir.name, "results": res, "curve": curve}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True)
    ap.add_argument("--mirror", required=True, help="folder holding the gowalla files (../shared/data)")
    ap.add_argument("--home", default=None, help="SPARCODE_HOME for the raw and processed data")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma-separated variant numbers (0 = the recipe)")
    ap.add_argument("--seed", type=int, default=0, help="train.seed of every variant")
    a = ap.parse_args()
    if a.home:
        os.environ["SPARCODE_HOME"] = a.home
    sc = str(Path(sys.executable).parent / "sparcode")
    subprocess.run([sc, "download", "gowalla", "--mirror", a.mirror], check=True, stdout=sys.stderr)
    out = subprocess.run([sc, "preprocess", "gowalla"], check=True, capture_output=True, text=True).stdout
    # "wrote FOLDER" when it preprocessed now, "reusing FOLDER (...)" when an identical folder exists
    data = next(line.split()[1] for line in out.splitlines() if line.startswith(("wrote ", "reusing ")))
    chosen = VARIANTS if a.only is None else [VARIANTS[int(i)] for i in a.only.split(",")]
    jobs = [(n, overrides(c, a.epochs, a.seed), a.runs, data) for n, c in chosen]
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=a.jobs) as pool:
        rows = list(pool.map(run_variant, jobs))
    print(report(rows, a.epochs, time.time() - t0))


def report(rows: list[dict[str, Any]], epochs: int, wall_s: float) -> str:
    from sparcode_cli.provenance import code_digest, git_commit

    r0 = rows[0]["results"]
    L = [
        "# Gowalla two-tower recipe (issue #12)",
        "",
        f"`experiments/scripts/gowalla_recipe.py --epochs {epochs}` at commit {git_commit()} (code digest "
        f"`{code_digest()}`); {wall_s / 60:.1f} min wall on 2 cores, every run at 1 torch thread. Two-tower, "
        "`dnn` query encoder, seed 0, the LightGCN split with 10% of each user's training items carved out "
        f"as validation; at most {epochs} epochs, early stopping on validation Recall@20 (patience 3); test "
        "= full ranking with training and validation items masked, all 29,858 users.",
        "",
        f"Recipe: `{' '.join('--set ' + o for o in RECIPE)}`. Each row below changes one thing.",
        "",
        "| variant | best epoch | train min | valid R@20 | test R@20 | test N@20 | test R@50 | run |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        res = r["results"]
        t, v = res["test"], res.get("valid") or {}
        L.append(
            f"| {r['name']} | {res.get('best_epoch', '?')} | {res.get('train_time_s', 0) / 60:.1f} | "
            f"{v.get('recall@20', float('nan')):.4f} | {t['recall@20']:.4f} | {t['ndcg@20']:.4f} | "
            f"{t['recall@50']:.4f} | `{r['run_id']}` |"
        )
    L += [
        "",
        f"BARS YoutubeDNN on the same split (trained on all training items, no validation carved out): "
        f"R@20 {BARS_YOUTUBEDNN[0]}, N@20 {BARS_YOUTUBEDNN[1]}. The recipe: R@20 {r0['test']['recall@20']:.4f}, "
        f"N@20 {r0['test']['ndcg@20']:.4f}.",
        "",
        "## Learning curves (validation Recall@20 per epoch)",
        "",
        "| variant | " + " | ".join(str(e) for e in range(1, epochs + 1)) + " |",
        "|---|" + "---:|" * epochs,
    ]
    for r in rows:
        vals = {h["epoch"]: h["valid"]["recall@20"] for h in r["curve"] if "valid" in h and h.get("epoch")}
        L.append(
            f"| {r['name']} | "
            + " | ".join(f"{vals[e]:.4f}" if e in vals else "" for e in range(1, epochs + 1))
            + " |"
        )
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
