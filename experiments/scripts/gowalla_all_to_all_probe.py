"""Issue #11: why all-to-all serves its warm start on Gowalla. One seed, one change at a time from the target
matrix's all-to-all (its Gowalla keys, 400 steps, validation and test on the matrix's 2,000-user sample).

    OMP_NUM_THREADS=1 .venv/bin/python \
        experiments/scripts/gowalla_all_to_all_probe.py --two-tower <runs>/two-tower-gowalla-... \
        --processed <SPARCODE_HOME>/processed/gowalla-93468f17600b \
        --out <folder> NAME [KEY=VALUE ...]

Trains one all-to-all run from the given two-tower run (`--init-from`) with the extra overrides and prints its
train.log (validation Recall@20 at the warm start and after 400 steps) and the served checkpoint's test metrics.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import torch
from rich.console import Console

from sparcode_cli.config import load_config
from sparcode_cli.reproduce.jobs import load
from sparcode_cli.training.trainer import train

MATRIX_KEYS = [
    "model.tower=embedding",
    "model.emb_dim=128",
    "model.dim=128",
    "model.token_dim=128",
    "model.user_id=true",
    "train.max_steps=400",
    "train.threads=1",
]
SAMPLE, SAMPLE_SEED = 2000, 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--two-tower", required=True, type=Path, help="the same-seed two-tower run to start from")
    p.add_argument("--processed", required=True, type=Path, help="Gowalla's processed folder")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("name")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    torch.set_num_threads(1)
    ds = load(a.processed, SAMPLE, SAMPLE_SEED)
    cfg = load_config("all-to-all", overrides=[*MATRIX_KEYS, *a.overrides])
    res = train(ds, cfg, a.out / a.name, console=Console(file=io.StringIO()), progress=False,
                init_from=a.two_tower)  # fmt: skip
    keep = ("recall@20", "recall@50", "ndcg@20")
    print(a.name, a.overrides, json.dumps({k: round(float(v), 4) for k, v in res.test.items() if k in keep}))
    print((res.run_dir / "train.log").read_text())


if __name__ == "__main__":
    main()
