"""How the user quantizer shapes SparCode's untrained warm start: one table row per quantizer configuration.

For each (two-tower run, SparCode run) pair the SparCode warm start is rebuilt as its trainer builds it
(waterfall.warm_start: the run's seed and model config, the two-tower's encoders, codebooks by k-means of every
training user's tokens, every code row cut at the target density) with some model keys replaced, and ranked
on validation and test (full ranking, query items masked). The grid varies the quantizer's structure (M
residual stages of N codewords, or one flat codebook, M = 1), its size N, the codes per user K_u and the head
noise that makes a user's K_u tokens differ. Nothing is trained, so a row isolates what the quantizer and the
cut cost; the trained runs are in the reproduce tables.

    OMP_NUM_THREADS=1 SPARCODE_HOME=<home> .venv/bin/python experiments/scripts/quantizer_probe.py \\
        --pair <two-tower run> <sparcode run> [--pair ...] --out experiments/results/gowalla-quantizer.md

On a dataset with `[reproduce-full.eval_users]` (Gowalla) validation and test are the fixed 2,000-user samples
of the reproduce tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import waterfall as W  # noqa: E402

from sparcode_cli.data.dataset import Dataset  # noqa: E402
from sparcode_cli.data.queries import training_queries  # noqa: E402
from sparcode_cli.metrics import evaluate  # noqa: E402
from sparcode_cli.models.base import QueryBatch  # noqa: E402
from sparcode_cli.models.sparcode import SparCode  # noqa: E402
from sparcode_cli.provenance import code_digest  # noqa: E402
from sparcode_cli.reproduce.matrix import expand  # noqa: E402

# (label, model-key overrides); {} is the run's own config
GRID: list[tuple[str, dict[str, Any]]] = [
    ("the run's own config", {}),
    (
        "M 2 residual, N 64, K_u 4, noise 1 (package default)",
        {"quantizer": "residual", "m": 2, "n_codewords": 64, "k_u": 4, "head_noise": 1.0},
    ),
    (
        "M 2 residual, N 64, K_u 1",
        {"quantizer": "residual", "m": 2, "n_codewords": 64, "k_u": 1, "head_noise": 0.0},
    ),
    # "M 2 product, N 64, K_u 1" (quantizer-warm-start.md) ran before the product quantizer was removed
    ("M 1, N 256, K_u 1", {"m": 1, "n_codewords": 256, "k_u": 1, "head_noise": 0.0}),
    ("M 1, N 256, K_u 4, noise 1", {"m": 1, "n_codewords": 256, "k_u": 4, "head_noise": 1.0}),
    ("M 1, N 1,024, K_u 1", {"m": 1, "n_codewords": 1024, "k_u": 1, "head_noise": 0.0}),
    ("M 1, N 4,096, K_u 1", {"m": 1, "n_codewords": 4096, "k_u": 1, "head_noise": 0.0}),
    ("M 1, N 4,096, K_u 2, noise 0.3", {"m": 1, "n_codewords": 4096, "k_u": 2, "head_noise": 0.3}),
    ("M 1, N 4,096, K_u 4, noise 1", {"m": 1, "n_codewords": 4096, "k_u": 4, "head_noise": 1.0}),
    ("M 1, N 8,192, K_u 1", {"m": 1, "n_codewords": 8192, "k_u": 1, "head_noise": 0.0}),
    ("M 1, N 16,384, K_u 1", {"m": 1, "n_codewords": 16384, "k_u": 1, "head_noise": 0.0}),
]


OWN_ROWS_MAX_USERS = 5_000  # the oracle keeps one dense row per training user in memory
OWN_ROWS_K = (1, 2, 4)


class OwnRows(nn.Module):
    """The quantizer's limit: one code per training user, its own unquantized token (so no quantization error),
    its row standardised and cut at the target density like every code row; a query adds the rows of the K
    training users whose tokens are nearest to its own (K = 1: the user's own row, as test users are training
    users). What remains below the two-tower is the cut's cost."""

    exclude_nonpositive = True

    def __init__(self, m: SparCode, ds: Dataset, k: int) -> None:
        super().__init__()
        self.m, self.k, self.cfg = m, k, m.cfg
        _, side = m._all_items()
        with torch.no_grad():
            z = torch.cat([m.user_tokens(q)[:, 0] for q in training_queries(ds, int(m.cfg["max_history"]))])
            g = m._normalise_rows(m.interaction.table_chunked(z, side))
            self.rows = F.relu(g - m.row_thresholds(g[:, 1:], float(m.row_density)))
        self.rows[:, 0] = 0.0
        self.z = z
        self.eval()

    @torch.no_grad()
    def score_all(self, q: QueryBatch) -> Tensor:
        near = torch.cdist(self.m.user_tokens(q)[:, 0], self.z).topk(self.k, largest=False).indices
        out = self.rows[near].sum(1)
        out[:, 0] = float("-inf")
        return out


def run_of(path: Path) -> W.Run:
    results = path / "results.json"
    return W.Run(
        path,
        json.loads((path / "meta.json").read_text()),
        tomllib.loads((path / "config.toml").read_text()),
        json.loads(results.read_text()) if results.exists() else {},
    )


def sample_size(dataset: str) -> int:
    return int(expand("reproduce-full", datasets=[dataset]).spec["eval_users"].get(dataset, 0))


def probe(tt: W.Run, sp: W.Run) -> list[str]:
    dataset = str(tt.meta["dataset"])
    sample = sample_size(dataset)
    ds, _ = W.load_data(str(tt.meta["data_hash"]), sample, 0)
    L = [
        f"## {dataset}",
        "",
        f"Two-tower `{tt.run_id}` (code digest `{tt.meta.get('code_digest')}`), SparCode config of `{sp.run_id}`; "
        f"{'the ' + str(sample) + '-user samples' if sample else 'every user'} of validation and test; target density "
        f"{sp.model_cfg('target_density')}.",
        "",
        "| quantizer | codes | valid R@20 | valid R@50 | test R@20 | test R@50 | candidate recall | index MB (est.) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    two = W.trained(tt)
    v = evaluate(two, ds, "valid", W.KS).summary
    t = evaluate(two, ds, "test", W.KS).summary
    L.append(
        f"| two-tower (exact) | – | {v['recall@20']:.4f} | {v['recall@50']:.4f} | {t['recall@20']:.4f} | "
        f"{t['recall@50']:.4f} | – | – |"
    )
    skipped: list[str] = []  # k-means of fewer users than codewords is not a codebook
    own_row = ""
    for label, ov in GRID:
        if int(ov.get("n_codewords", 0)) > ds.n_users:
            skipped.append(label)
            continue
        if ov and all(sp.model_cfg(k) == v for k, v in ov.items()):  # the run's own config: its row again
            L.append(f"| {label} |" + own_row.split("|", 2)[2])
            continue
        t0 = time.perf_counter()
        m = W.warm_start(tt, sp, ds, ov)
        v = evaluate(m, ds, "valid", W.KS).summary
        c = W.score(m, ds, True)
        keep = max(1, round(float(m.target_density) * ds.n_items))
        mb = m.n_codes * keep * 8 / 2**20  # 4-byte item id + 4-byte score per kept entry, every code built
        L.append(
            f"| {label} | {m.n_codes:,} | {v['recall@20']:.4f} | {v['recall@50']:.4f} | {c.r20:.4f} | {c.r50:.4f} | "
            f"{c.cand:.3f} | {mb:,.1f} |"
        )
        if not ov:
            own_row = L[-1]
        print(f"{dataset} {label}: {time.perf_counter() - t0:.0f} s", flush=True)
    if ds.n_users <= OWN_ROWS_MAX_USERS:
        m = W.warm_start(tt, sp, ds, {"k_u": 1, "head_noise": 0.0})
        for k in OWN_ROWS_K:
            o = OwnRows(m, ds, k)
            v = evaluate(o, ds, "valid", W.KS).summary
            t = evaluate(o, ds, "test", W.KS).summary
            L.append(
                f"| limit: one code per training user, rows of its {k} nearest | {ds.n_users:,} | "
                f"{v['recall@20']:.4f} | {v['recall@50']:.4f} | {t['recall@20']:.4f} | {t['recall@50']:.4f} | – | – |"
            )
    if skipped:
        L += ["", f"Not run, N above the {ds.n_users:,} training users: {'; '.join(skipped)}."]
    return L


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", nargs=2, action="append", required=True, metavar=("TWO_TOWER", "SPARCODE"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    lines = [
        "# The user quantizer at SparCode's warm start",
        "",
        "Generated by `experiments/scripts/quantizer_probe.py` (its docstring says how each row is made), code "
        f"digest `{code_digest()}`. Untrained warm starts, one seed; index MB = codes x kept items per row x 8 "
        "bytes if every code were built.",
        "",
    ]
    for tt_path, sp_path in args.pair:
        lines += probe(run_of(Path(tt_path)), run_of(Path(sp_path))) + [""]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
