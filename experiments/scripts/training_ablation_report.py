"""Tables for experiments/results/movielens-100k-sparcode-training-ablation.md from training_ablation.py's
summary (and warm_start_seeds.py's output if present). Prints markdown to stdout.

    SPARCODE_HOME=<home> python experiments/scripts/training_ablation_report.py --summary <runs>/ablation_summary.json \
        [--warm <runs>/warm_start.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Iterator
from pathlib import Path

from sparcode_cli.paths import processed_root

LABELS = {
    "default": "default",
    "a": "a `model.quantizer=product`, `model.n_codewords=64` (the old codebook)",  # removed; committed summaries
    "b": "b `model.logit_scale=5.0` (the old temperature)",
    "c": "c `train.lr=0.001` (the old step)",
    "d": "d `model.leak=0`",
    "e": "e `model.target_density=1.0` (dense, not an index)",
    "f": "f `train.max_steps=1500`",
    "g": "g `model.head_noise=0.5`",
}
KEYS = [
    ("test_r20", "test R@20"),
    ("test_r50", "test R@50"),
    ("test_ndcg20", "test NDCG@20"),
    ("valid_r20", "valid R@20"),
]


def read(run: Path) -> dict:
    r = json.loads((run / "results.json").read_text())
    meta = json.loads((run / "meta.json").read_text())
    best_step = None
    traj = []
    warm_valid, trained_valid = None, []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e.get("epoch") == r.get("best_epoch"):
            best_step = e.get("step")
        if "valid" in e:
            traj.append(f"{e['step']}:{e['valid']['recall@20']:.3f}")
            if e.get("epoch") == 0:
                warm_valid = e["valid"]["recall@20"]
            else:
                trained_valid.append(e["valid"]["recall@20"])
    return {
        "test_r20": r["test"]["recall@20"],
        "test_r50": r["test"]["recall@50"],
        "test_ndcg20": r["test"]["ndcg@20"],
        "valid_r20": r["valid"]["recall@20"],
        "best_step": best_step,
        "steps": r.get("steps"),
        "status": r.get("status"),
        "run": run.name,
        "code_digest": meta.get("code_digest"),
        "git_commit": meta.get("git_commit"),
        "traj": " ".join(traj),
        "data_hash": meta.get("data_hash"),
        "train_s": r.get("train_time_s"),
        # best trained epoch's valid R@20 minus the warm start's (epoch 0), when the run validated its start
        "gain": max(trained_valid) - warm_valid if warm_valid is not None and trained_valid else None,
    }


def ms(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def variant_runs(sc: dict, seeds: list[str]) -> Iterator[tuple[str, str, dict]]:
    """(variant, seed, run summary) for every finished SparCode run, variants in LABELS order."""
    for v in LABELS:
        for k in seeds:
            if r := sc.get(v, {}).get(k):
                yield v, k, r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--summary", type=Path, required=True)
    ap.add_argument("--warm", type=Path)
    a = ap.parse_args()
    s = json.loads(a.summary.read_text())
    seeds = sorted(s["two_tower"])
    tt = {k: read(Path(p)) for k, p in s["two_tower"].items()}
    sc = {v: {k: read(Path(p)) for k, p in d.items()} for v, d in s["sparcode"].items()}
    grid = json.loads(a.warm.read_text()) if a.warm and a.warm.exists() else {"grid": {}, "warm": {}}
    warm = grid["warm"].get("default", {})
    out: list[str] = []
    # per-seed table
    out += ["### Per run (best checkpoint, selected on valid R@20)", ""]
    out += [
        "| variant | seed | test R@20 | test R@50 | test NDCG@20 | valid R@20 | best step | steps | valid R@20 by step | run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in seeds:
        r = tt[k]
        out.append(
            f"| two-tower (reference) | {k} | {r['test_r20']:.4f} | {r['test_r50']:.4f} | {r['test_ndcg20']:.4f} "
            f"| {r['valid_r20']:.4f} | {r['best_step']} | {r['steps']} | {r['traj']} | `{r['run']}` |"
        )
    for step, label in (("2", "warm start, no cut (untrained)"), ("3", "warm start, cut 5% (untrained)")):
        for k in seeds:
            if k in warm:
                w = warm[k][step]
                out.append(
                    f"| {label} | {k} | {w['test_r20']:.4f} | {w['test_r50']:.4f} | "
                    f"{w['test_ndcg20']:.4f} | {w['valid_r20']:.4f} | 0 | 0 | 0:{w['valid_r20']:.3f} | — |"
                )
    for v, k, r in variant_runs(sc, seeds):
        out.append(
            f"| {LABELS[v]} | {k} | {r['test_r20']:.4f} | {r['test_r50']:.4f} | {r['test_ndcg20']:.4f} "
            f"| {r['valid_r20']:.4f} | {r['best_step']} | {r['steps']} | {r['traj']} | `{r['run']}` |"
        )
    # mean table
    out += [
        "",
        "### Mean ± std over seeds; Δ = variant − default per seed (sign consistent across seeds?)",
        "",
    ]
    out += [
        "| variant | n | "
        + " | ".join(h for _, h in KEYS)
        + " | best steps | best trained − warm start, valid R@20 per seed | Δ test R@20 per seed"
        " | Δ test R@50 per seed | Δ R@50 mean | same sign |",
        "|---|---|" + "---|" * len(KEYS) + "---|---|---|---|---|---|",
    ]
    out.append(
        f"| two-tower (reference) | {len(seeds)} | "
        + " | ".join(ms([tt[k][key] for k in seeds]) for key, _ in KEYS)
        + f" | {', '.join(str(tt[k]['best_step']) for k in seeds)} | | | | | |"
    )
    ws = [k for k in seeds if k in warm]
    if ws:
        out.append(
            f"| warm start, no cut (untrained, waterfall step 2) | {len(ws)} | "
            + " | ".join(ms([warm[k]["2"][key] for k in ws]) for key, _ in KEYS)
            + " | 0 | | | | | |"
        )
        out.append(
            f"| warm start, cut 5% (untrained, waterfall step 3) | {len(ws)} | "
            + " | ".join(ms([warm[k]["3"][key] for k in ws]) for key, _ in KEYS)
            + " | 0 | | | | | |"
        )
    d = sc.get("default", {})
    for v in LABELS:
        runs = sc.get(v, {})
        ks = [k for k in seeds if k in runs]
        if not ks:
            continue
        row = f"| {LABELS[v]} | {len(ks)} | " + " | ".join(ms([runs[k][key] for k in ks]) for key, _ in KEYS)
        row += f" | {', '.join(str(runs[k]['best_step']) for k in ks)}"
        row += " | " + ", ".join("—" if runs[k]["gain"] is None else f"{runs[k]['gain']:+.4f}" for k in ks)
        if v == "default":
            out.append(row + " | | | | |")
            continue
        both = [k for k in ks if k in d]
        d20 = [runs[k]["test_r20"] - d[k]["test_r20"] for k in both]
        d50 = [runs[k]["test_r50"] - d[k]["test_r50"] for k in both]
        same = (
            "yes"
            if len(d50) == 3 and (all(x > 0 for x in d50) or all(x < 0 for x in d50))
            else ("no" if len(d50) == 3 else f"({len(d50)} seeds)")
        )
        same20 = "yes" if len(d20) == 3 and (all(x > 0 for x in d20) or all(x < 0 for x in d20)) else "no"
        row += (
            f" | {', '.join(f'{x:+.4f}' for x in d20)} | {', '.join(f'{x:+.4f}' for x in d50)} | "
            f"{statistics.mean(d50):+.4f} | R@50 {same}, R@20 {same20} |"
        )
        out.append(row)
    # the untrained warm start over quantizer / token-head settings
    if grid["warm"]:
        out += [
            "",
            "### The untrained warm start by quantizer and token heads (mean ± std over seeds)",
            "",
            "| setting | model keys | distinct codes (training users) | no cut: test R@20 | no cut: test R@50 "
            "| cut 5%: test R@20 | cut 5%: test R@50 | cut 5%: valid R@20 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, per_seed in grid["warm"].items():
            ks = sorted(per_seed)
            keys = ", ".join(f"`{k}={v}`" for k, v in grid["grid"].get(name, {}).items()) or "(defaults)"
            codes = ", ".join(str(per_seed[k]["codes"]) for k in ks)
            cells = [ms([per_seed[k][st][key] for k in ks]) for st, key in (("2", "test_r20"), ("2", "test_r50"),
                     ("3", "test_r20"), ("3", "test_r50"), ("3", "valid_r20"))]  # fmt: skip
            out.append(f"| {name} | {keys} | {codes} | " + " | ".join(cells) + " |")
    # provenance
    dh = {r["data_hash"] for r in tt.values()}
    out += ["", "### Provenance", ""]
    for h in sorted(dh):
        m = json.loads((processed_root() / h / "meta.json").read_text())
        out.append(f"- processed data: data_hash `{h}`, content_digest `{m.get('content_digest')}`")
    digests = {
        (r["code_digest"], r["git_commit"])
        for r in list(tt.values()) + [x for dd in sc.values() for x in dd.values()]
    }
    out.append(
        f"- (code_digest, git_commit) over all runs: {', '.join(f'`{c}` / `{g}`' for c, g in sorted(digests))}"
    )
    out += [
        "",
        "| variant | seed | run | code_digest | git_commit | status | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in seeds:
        r = tt[k]
        out.append(
            f"| two-tower | {k} | `{r['run']}` | `{r['code_digest']}` | `{r['git_commit']}` | {r['status']} | {r['train_s']} |"
        )
    for v, k, r in variant_runs(sc, seeds):
        out.append(
            f"| {v} | {k} | `{r['run']}` | `{r['code_digest']}` | `{r['git_commit']}` | {r['status']} | {r['train_s']} |"
        )
    print("\n".join(out))


if __name__ == "__main__":
    main()
