"""SparCode's warm start evaluated as it is, before any training: encoders and heads copied from a two-tower run,
codebooks from k-means of every training user's tokens, every code row cut at the final target density.
Compares the product and the residual quantizer (experiments/results/movielens-sparcode-ablation.md, session 3).

    .venv/bin/python experiments/scripts/warm_start_step0.py ~/.cache/sparcode/processed/movielens-<hash> \
        experiments/runs/two-tower-movielens-<hash>
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from sparcode_cli.config import load_config
from sparcode_cli.data.queries import last_items, query_batch
from sparcode_cli.data.store import load_dataset
from sparcode_cli.metrics import evaluate
from sparcode_cli.models import attach_features, build_model, load_checkpoint
from sparcode_cli.models.base import DataContext


def main(processed: str, two_tower_run: str) -> None:
    torch.set_num_threads(1)
    ds = load_dataset(processed)
    ckpt = load_checkpoint(two_tower_run + "/checkpoint_best.pt")
    users = np.arange(1, ds.n_users + 1)
    users = users[ds.train.lengths()[users] > 0]
    q = query_batch(last_items(ds.train, users, 50), ds.features.user_feats[users])
    for kind in ("product", "residual"):
        torch.manual_seed(0)
        # one code per token: the warm start as trained (waterfall step 3), not as served with probes
        cfg = load_config("sparcode", overrides=[f"model.quantizer={kind}", "model.probes=1"])
        m = build_model("sparcode", cfg["model"], DataContext.from_dataset(ds))
        attach_features(m, ds.features)
        m.init_from_run(ckpt, q)  # k-means of all training users' tokens
        m.n_steps.fill_(m.density_warmup)  # past the density warm-up: rows cut at the final density
        m.row_density.fill_(m.target_density)
        m.eval()
        with torch.no_grad():
            tuples = len(torch.unique(m.codes(q)))
        v = evaluate(m, ds, "valid", (20, 50)).summary
        t = evaluate(m, ds, "test", (20, 50)).summary
        print(
            f"{ds.name} {kind:8s} code tuples {tuples:5d}  valid R@20 {v['recall@20']:.4f}  "
            f"test R@20 {t['recall@20']:.4f} R@50 {t['recall@50']:.4f} NDCG@20 {t['ndcg@20']:.4f}"
        )


if __name__ == "__main__":
    main(*sys.argv[1:3])
