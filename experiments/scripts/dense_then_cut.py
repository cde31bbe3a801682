"""The cut inside the training loss against the cut only at index time, under the current defaults.

For each two-tower run of --encoder in --runs, SparCode is trained from it with the target matrix's overrides
and `model.target_density=1.0` (no cut anywhere in training: every code row dense) into --out, by
sparcode_ablation.py's `train` (a finished run of this code there is reused), and its best checkpoint (selected
on validation, dense) is cut afterwards, two ways:

    row quantile   every code row cut at its own 95% quantile over all items (row density 0.05): the trained
                   model's own rule, scored exactly (`row_density` set to the target, as served: model.probes)
    best 5% kept   the dense index built with `sparcode index --max-per-code floor(0.05 x n_items)` (each code's
                   best items by its dense score) and served from it (`sparcode eval --index`)

Both are compared with the target matrix's own SparCode run of the same seed (trained under the cut at 5%, the
default) and the two-tower: test Recall@20 / @50 mean ± std over the seeds, a paired bootstrap over test users
(the seeds together) of the dense model against both and of the default against the two-tower, then each seed.

    SPARCODE_HOME=<home> .venv/bin/python experiments/scripts/dense_then_cut.py \\
        --runs <the target matrix's runs> --encoder dnn --seeds 0,1,2 --out <folder>
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sparcode_ablation import (  # noqa: E402
    best,
    chosen_seeds,
    compare,
    default_runs,
    overrides,
    train,
    two_tower_runs,
)
from waterfall import KS, SPLIT, load_data, with_density  # noqa: E402

from sparcode_cli.config import load_config  # noqa: E402
from sparcode_cli.data.dataset import Dataset  # noqa: E402
from sparcode_cli.evaluation import evaluate_index  # noqa: E402
from sparcode_cli.indexing import build_index  # noqa: E402
from sparcode_cli.metrics import evaluate  # noqa: E402
from sparcode_cli.models import load_checkpoint, model_from_checkpoint  # noqa: E402
from sparcode_cli.models.sparcode import SparCode  # noqa: E402

METRICS = ("recall@20", "recall@50")
TARGET_DENSITY = float(load_config("sparcode")["model"]["target_density"])  # the default's cut (0.05)


def test_of(run: Path) -> list[float]:
    return [best(run)[m] for m in METRICS]


def cut_afterwards(run: Path, ds: Dataset, index_dir: Path) -> tuple[list[float], list[float], float]:
    """(row-quantile cut, best-5%-kept index) test Recall@20 / @50 of a dense run, and the index's density."""
    model = model_from_checkpoint(load_checkpoint(run / "checkpoint_best.pt"))
    assert isinstance(model, SparCode)
    summary = evaluate(with_density(model, TARGET_DENSITY), ds, SPLIT, KS).summary
    quantile = [summary[m] for m in METRICS]
    cap = math.floor(TARGET_DENSITY * ds.n_items)  # at most the target density
    manifest = build_index(run, index_dir, ds=ds, threads=1, max_per_code=cap, progress=False)
    metrics = evaluate_index(index_dir, ds=ds, split=SPLIT, threads=1, latency_queries=0, progress=False)
    return quantile, [metrics[m] for m in METRICS], float(manifest["density"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", required=True, type=Path, help="a runs folder with the target matrix's runs")
    p.add_argument("--dataset", default="movielens-100k")
    p.add_argument("--encoder", default="dnn")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seeds", help="comma-separated subset of the two-tower runs' seeds (default: all)")
    p.add_argument("--jobs", type=int, default=2, help="training runs at once (1 thread each)")
    a = p.parse_args()
    torch.set_num_threads(1)
    tts = two_tower_runs(a.runs, a.dataset, a.encoder)
    seeds = chosen_seeds(tts, a.seeds, a.runs, a.encoder)
    a.out.mkdir(parents=True, exist_ok=True)
    sets = {s: overrides(s, a.encoder, a.dataset, "model.target_density", "1.0", []) for s in seeds}
    with ThreadPoolExecutor(a.jobs) as pool:
        fut = {s: pool.submit(train, tts[s], sets[s], a.dataset, a.out, [a.runs]) for s in seeds}
        dense = {s: fut[s].result() for s in seeds}
    ref = dict(zip(seeds, default_runs(a.runs, tts, seeds, a.encoder, a.dataset), strict=True))
    # every run is of --dataset: its processed data is loaded once
    data_hash = json.loads((dense[seeds[0]] / "meta.json").read_text())["data_hash"]
    ds, _ = load_data(data_hash, 0, 0)
    rows: dict[str, list[list[float]]] = {k: [] for k in ("tt", "ref", "dense", "quantile", "kept")}
    densities = []
    for s in seeds:
        rows["tt"].append(test_of(tts[s]))
        rows["ref"].append(test_of(ref[s]))
        rows["dense"].append(test_of(dense[s]))
        q, k, d = cut_afterwards(dense[s], ds, a.out / f"index-best-kept-seed{s}")
        rows["quantile"].append(q)
        rows["kept"].append(k)
        densities.append(d)
    labels = {
        "tt": "two-tower (Faiss flat)",
        "ref": "trained under the cut (default), served from its index",
        "dense": "trained dense (`target_density` 1.0), served dense",
        "quantile": f"trained dense, each row cut at its {1 - TARGET_DENSITY:.0%} quantile afterwards",
        "kept": f"trained dense, index keeping each code's best {TARGET_DENSITY:.0%} (`--max-per-code`)",
    }
    print(f"{a.dataset}, {a.encoder}, seeds {seeds}; dense runs: {', '.join(dense[s].name for s in seeds)}")
    print(f"index density of the best-kept index per seed: {', '.join(f'{d:.4f}' for d in densities)}\n")
    print("| model | test R@20 | test R@50 | R@50 − default |")
    print("|---|---:|---:|---:|")
    base = np.array(rows["ref"])[:, 1].mean()
    for key, label in labels.items():
        x = np.array(rows[key])
        ms = " | ".join(
            f"{x[:, j].mean():.4f} ± {x[:, j].std(ddof=1) if len(x) > 1 else 0.0:.4f}" for j in (0, 1)
        )
        print(f"| {label} | {ms} | {x[:, 1].mean() - base:+.4f} |")
    tt_runs, ref_runs, dense_runs = ([r[s] for s in seeds] for r in (tts, ref, dense))
    print("\nPaired bootstrap over test users, the seeds together (ΔR@20 / ΔR@50):")
    for name, a_runs, b_runs in (
        ("trained dense, served dense − default", dense_runs, ref_runs),
        ("trained dense, served dense − two-tower", dense_runs, tt_runs),
        ("default − two-tower", ref_runs, tt_runs),
    ):
        print(f"- {name}: " + " / ".join(compare(a_runs, b_runs, m) for m in METRICS))
    print("\nPer seed (test R@20 / R@50):")
    for key, label in labels.items():
        print(
            f"- {label}: "
            + "; ".join(f"seed {s}: {v[0]:.4f} / {v[1]:.4f}" for s, v in zip(seeds, rows[key], strict=True))
        )


if __name__ == "__main__":
    main()
