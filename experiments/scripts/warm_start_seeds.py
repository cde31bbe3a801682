"""The untrained SparCode warm start per seed (waterfall.py's steps 2 and 3: quantized, no cut / cut at the
target density), rebuilt exactly as waterfall.py rebuilds it (the SparCode run's seed and model config,
`init_from_run` on the two-tower checkpoint, k-means of every training user's tokens), on valid and test; for
the default config and for each quantizer / token-head setting of GRID (model config keys replaced). The
product-quantizer rows of movielens-100k-sparcode-warm-start.md come from before that quantizer was removed.

    SPARCODE_HOME=<home> python experiments/scripts/warm_start_seeds.py --summary <runs>/ablation_summary.json \
        --out <runs>/warm_start.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

from sparcode_cli.data.queries import training_queries
from sparcode_cli.data.store import load_dataset
from sparcode_cli.metrics import evaluate
from sparcode_cli.paths import processed_root

spec = importlib.util.spec_from_file_location("waterfall", Path(__file__).with_name("waterfall.py"))
wf = importlib.util.module_from_spec(spec)
sys.modules["waterfall"] = wf
spec.loader.exec_module(wf)  # type: ignore[union-attr]


GRID: dict[str, dict[str, object]] = {
    "default": {},
    "residual, N=64": {"quantizer": "residual", "n_codewords": 64},
    "residual, M=3": {"m": 3},
    "K_u=8": {"k_u": 8},
    "K_u=1, head_noise=0": {"k_u": 1, "head_noise": 0.0},
    "head_noise=0.5": {"head_noise": 0.5},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--summary", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    s = json.loads(a.summary.read_text())
    folders = {Path(p).parent for p in s["two_tower"].values()}
    runs, _ = wf.read_runs(sorted(folders))
    out: dict[str, dict] = {}
    for name, over in GRID.items():
        for seed, sp_path in sorted(s["sparcode"]["default"].items()):
            sp = runs[Path(sp_path).name]
            tt = runs[Path(s["two_tower"][seed]).name]
            ds = load_dataset(processed_root() / sp.meta["data_hash"])
            ws = wf.warm_start(tt, sp, ds, over)
            res: dict[str, object] = {
                "codes": int(
                    torch.unique(
                        torch.cat([ws.codes(q) for q in training_queries(ds, int(ws.cfg["max_history"]))])
                    ).numel()
                )
            }
            for step, dens in (("2", 1.0), ("3", float(ws.target_density))):
                m = wf.with_density(ws, dens)
                v = evaluate(m, ds, "valid", (20, 50)).summary
                t = evaluate(m, ds, "test", (20, 50)).summary
                res[step] = {
                    "valid_r20": v["recall@20"],
                    "test_r20": t["recall@20"],
                    "test_r50": t["recall@50"],
                    "test_ndcg20": t["ndcg@20"],
                }
            print(name, seed, res, flush=True)
            out.setdefault(name, {})[seed] = res
            a.out.write_text(json.dumps({"grid": {k: GRID[k] for k in out}, "warm": out}, indent=1))


if __name__ == "__main__":
    main()
