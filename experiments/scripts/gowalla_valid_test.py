"""Issue #11: why validation and test rank the Gowalla two-tower and SparCode the other way round.

    SPARCODE_HOME=<home> OMP_NUM_THREADS=1 .venv/bin/python experiments/scripts/gowalla_valid_test.py \
        <runs>/two-tower-gowalla-... <runs>/sparcode-gowalla-...

Scores both runs' best checkpoints exactly (full ranking, query items masked, as `sparcode eval --run`) on every
validation and every test user, and splits each split's Recall@20 into additive parts: Recall@20 is the mean over
users of hits / targets, so a target t of user u adds hit(t) / (|T_u| x U). Summing those over a group of targets
(by the target item's training count) or of users (by training-history length) gives that group's part; the
parts add up to the split's Recall@20. Printed as markdown tables: each group's share of the weight, its part for
both models, and SparCode minus the two-tower.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from sparcode_cli.data.store import load_dataset
from sparcode_cli.metrics import evaluate
from sparcode_cli.models import attach_features, load_checkpoint, model_from_checkpoint
from sparcode_cli.paths import processed_root

POP_EDGES = [0, 10, 30, 100, 300, np.inf]  # training count of the target item
HIST_EDGES = [0, 10, 20, 50, 100, np.inf]  # training items of the user
K = 20


def contributions(ds, split: str, model) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # noqa: ANN001
    """Per target: its weight 1 / (|T_u| U), whether it is in the top K, its item, its user's row."""
    es = ds.split(split)
    res = evaluate(model, ds, split, (K,), batch_size=2048)
    # each distinct (user, item) target once, as metrics.evaluate counts them
    pairs = np.unique(
        np.repeat(np.arange(es.targets.n_rows), es.targets.lengths()) * (ds.n_items + 1) + es.targets.values
    )
    rows, items = pairs // (ds.n_items + 1), pairs % (ds.n_items + 1)
    tl = np.bincount(rows, minlength=es.targets.n_rows)
    hit = (res.topk[rows, :K] == items[:, None]).any(1)
    w = 1.0 / (tl[rows] * (tl > 0).sum())
    assert abs(float((w * hit).sum()) - res.summary[f"recall@{K}"]) < 1e-9, "the parts must add up to Recall"
    return w, hit, items, rows


def groups(key: np.ndarray, edges: list[float]) -> np.ndarray:
    """Group index of each value: (edges[i], edges[i + 1]], the first group from -inf."""
    return np.digitize(key, edges[1:-1], right=True)


def table(title: str, edges: list[float], key: np.ndarray, w: np.ndarray, hits: dict[str, np.ndarray]) -> str:
    names = list(hits)
    group = groups(key, edges)
    out = [
        f"| {title} | weight | " + " | ".join(names) + f" | {names[1]} − {names[0]} |",
        "|---|---:|" + "---:|" * (len(names) + 1),
    ]
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        g = group == i
        parts = [float((w * h)[g].sum()) for h in hits.values()]
        label = f"{lo:.0f}–{hi:.0f}" if np.isfinite(hi) else f"> {lo:.0f}"
        out.append(
            f"| {label} | {w[g].sum():.3f} | "
            + " | ".join(f"{p:.4f}" for p in parts)
            + f" | {parts[1] - parts[0]:+.4f} |"
        )
    tot = [float((w * h).sum()) for h in hits.values()]
    out.append("| all | 1.000 | " + " | ".join(f"{p:.4f}" for p in tot) + f" | {tot[1] - tot[0]:+.4f} |")
    return "\n".join(out)


def main() -> None:
    torch.set_num_threads(1)
    runs = [Path(p) for p in sys.argv[1:3]]
    ds = load_dataset(processed_root() / json.loads((runs[0] / "meta.json").read_text())["data_hash"])
    models = {}  # in the order given: the difference column is the second run minus the first
    for run in runs:
        ck = load_checkpoint(run / "checkpoint_best.pt")
        m = model_from_checkpoint(ck)
        attach_features(m, ds.features)
        models[f"{ck['model']} ({run.name})" if ck["model"] in models else ck["model"]] = m
    count = ds.item_counts()
    hist = ds.train.lengths()
    per_weight, weight = {}, {}  # split -> per popularity group: (sparcode - two-tower) / weight, and weight
    for split in ("valid", "test"):
        hits: dict[str, np.ndarray] = {}
        for name, m in models.items():
            w, hits[name], items, rows = contributions(ds, split, m)
        users = ds.split(split).users
        print(f"\n## {split}: {len(users):,} users, {len(items):,} targets\n")
        print(table("target's training count", POP_EDGES, count[items], w, hits))
        print()
        print(table("user's training items", HIST_EDGES, hist[users[rows]], w, hits))
        g = groups(count[items], POP_EDGES)
        a, b = hits.values()
        weight[split] = np.bincount(g, w, len(POP_EDGES) - 1)
        per_weight[split] = np.bincount(g, w * (b.astype(float) - a), len(POP_EDGES) - 1) / weight[split]
    mixed = float(per_weight["valid"] @ weight["test"])
    print(
        f"\nValidation's difference per unit weight of each popularity group, at test's group weights: {mixed:+.4f} "
        f"(validation as it is: {float(per_weight['valid'] @ weight['valid']):+.4f}; test: "
        f"{float(per_weight['test'] @ weight['test']):+.4f})."
    )


if __name__ == "__main__":
    main()
