"""SparCode's untrained warm start served as the model serves it (`model.probes` codes per token), over a grid
of token-head noise, codebook size and K_u x P: the screen of experiments/results/movielens-100k-after-probes.md.

For every two-tower run of --encoder in --runs and the default SparCode run started from it (the target
matrix's, found by its run id), the warm start is rebuilt as its trainer builds it (waterfall.warm_start: the
run's seed and model config, k-means codebooks of every training user's tokens, rows cut at the target density)
with the grid's model keys replaced, and ranked on validation and test (full ranking, query items masked).
Nothing is trained: the screen only says which settings are worth training (sparcode_ablation.py); choose on
validation.

    OMP_NUM_THREADS=1 SPARCODE_HOME=<home> .venv/bin/python experiments/scripts/token_head_probe.py \\
        --runs <the target matrix's runs> --encoder sasrec --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import waterfall as W  # noqa: E402
from quantizer_probe import run_of  # noqa: E402
from sparcode_ablation import chosen_seeds, default_runs, two_tower_runs  # noqa: E402

from sparcode_cli.metrics import evaluate  # noqa: E402

# (label, model-key overrides over the run's config)
GRID: list[tuple[str, dict[str, Any]]] = [
    ("head noise 1, P 1", {"probes": 1, "head_noise": 1.0}),
    ("head noise 0.5, P 1", {"probes": 1, "head_noise": 0.5}),
    ("head noise 1, P 4", {"probes": 4, "head_noise": 1.0}),
    ("head noise 0.75, P 4", {"probes": 4, "head_noise": 0.75}),
    ("head noise 0.5, P 4", {"probes": 4, "head_noise": 0.5}),
    ("head noise 0.25, P 4", {"probes": 4, "head_noise": 0.25}),
    ("head noise 1, N 128, P 4", {"probes": 4, "head_noise": 1.0, "n_codewords": 128}),
    ("head noise 1, N 256, P 4", {"probes": 4, "head_noise": 1.0, "n_codewords": 256}),
    ("head noise 0.5, N 128, P 4", {"probes": 4, "head_noise": 0.5, "n_codewords": 128}),
    ("head noise 0.5, N 256, P 4", {"probes": 4, "head_noise": 0.5, "n_codewords": 256}),
    ("head noise 0.5, K_u 8, P 2", {"probes": 2, "head_noise": 0.5, "k_u": 8}),
    ("head noise 0.5, K_u 2, P 8", {"probes": 8, "head_noise": 0.5, "k_u": 2}),
    ("K_u 1 (noise 0), P 16", {"probes": 16, "head_noise": 0.0, "k_u": 1}),
]
METRICS = ("valid R@20", "valid R@50", "test R@20", "test R@50")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, required=True)
    ap.add_argument("--dataset", default="movielens-100k")
    ap.add_argument("--encoder", default="dnn")
    ap.add_argument("--seeds", help="comma-separated subset of the two-tower runs' seeds (default: all)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    tts = two_tower_runs(a.runs, a.dataset, a.encoder)
    seeds = chosen_seeds(tts, a.seeds, a.runs, a.encoder)
    defaults = default_runs(a.runs, tts, seeds, a.encoder, a.dataset)  # the target matrix's, by run id
    pairs = [(s, run_of(tts[s]), run_of(sp)) for s, sp in zip(seeds, defaults, strict=True)]
    cells: dict[str, list[list[float]]] = {}
    for seed, tt, sp in pairs:
        ds, _ = W.load_data(str(tt.meta["data_hash"]), 0, 0)
        for label, ov in [("two-tower (exact)", {}), *GRID]:
            m = W.trained(tt) if not ov else W.warm_start(tt, sp, ds, ov)
            v = evaluate(m, ds, "valid", W.KS).summary
            t = evaluate(m, ds, "test", W.KS).summary
            cells.setdefault(label, []).append(
                [v["recall@20"], v["recall@50"], t["recall@20"], t["recall@50"]]
            )
            print(
                json.dumps(
                    {"seed": seed, "setting": label, **dict(zip(METRICS, cells[label][-1], strict=True))}
                ),
                file=sys.stderr,
            )
    print(
        f"{a.dataset}, `{a.encoder}`, untrained warm starts of seeds {[p[0] for p in pairs]}, mean over seeds:\n"
    )
    print("| setting | " + " | ".join(METRICS) + " |")
    print("|---|" + "---:|" * len(METRICS))
    for label, rows in cells.items():
        print(f"| {label} | " + " | ".join(f"{x:.4f}" for x in np.mean(rows, axis=0)) + " |")


if __name__ == "__main__":
    main()
