"""Multi-probe serving of a trained SparCode run: each user token reads its P nearest codes' rows, not 1.

The index is unchanged (same rows, same density); only the serving side changes, as IVF's nprobe does for
Faiss: a user token z_k is quantized to the P code ids whose decoded vectors ẑ are nearest to z_k (squared L2
over every code id: for the residual quantizer the exact P nearest sums, not a beam), and the user's score is
the sum of those K_u x P cut rows (a code hit twice counts twice, as the model's count x row does). P = 1 is
not the model's own score for the residual quantizer, which assigns greedily, stage by stage: P = 0 is that
(checked against `metrics.evaluate` of the run: the script stops if it differs).

Per P it prints test Recall@20 / @50 (full ranking, query items masked: `metrics.evaluate`), the candidate
recall (the share of a user's test targets with a positive score), the mean retrievable set, and the serving
cost per user: distinct rows read and index entries summed (the kept items of those rows), against Faiss
flat's n_items x d multiply-adds.

    SPARCODE_HOME=<home> OMP_NUM_THREADS=1 .venv/bin/python experiments/scripts/multi_probe_probe.py \
        <sparcode run folder> [...] --probes 1,2,4,8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from waterfall import candidate_recall  # experiments/scripts/waterfall.py: the same definition as its steps

from sparcode_cli.metrics import evaluate
from sparcode_cli.models import load_checkpoint, model_from_checkpoint
from sparcode_cli.models.base import QueryBatch
from sparcode_cli.models.sparcode import SparCode
from sparcode_cli.paths import processed_root
from sparcode_cli.reproduce import jobs

SPLIT = "test"


class MultiProbe(nn.Module):
    """score(u, i) = sum over the K_u tokens and their P nearest code ids c of row_c(i) (the cut rows)."""

    exclude_nonpositive = True

    def __init__(self, model: SparCode, probes: int) -> None:
        """probes 0: the model's own (greedy, for the residual quantizer) assignment, one code per token."""
        super().__init__()
        self.m, self.p, self.cfg = model, probes, model.cfg
        ids = torch.arange(model.n_codes)
        with torch.no_grad():
            self.rows = model.eval().score_codes(ids)  # (n_codes, n_items + 1), the index's rows
            self.decoded = model.quantizer.decode(ids)  # (n_codes, D)
        self.row_nnz = (self.rows[:, 1:] > 0).sum(1)
        self.read_rows: list[int] = []
        self.read_entries: list[int] = []
        self.eval()

    @torch.no_grad()
    def codes(self, q: QueryBatch) -> Tensor:
        """(B, K_u * P) code ids: each token's P nearest decoded codes."""
        if self.p == 0:
            return self.m.codes(q)
        z = self.m.user_tokens(q)  # (B, K_u, D)
        d2 = torch.cdist(z.reshape(-1, z.shape[-1]), self.decoded).pow(2)  # (B K_u, n_codes)
        return d2.topk(self.p, dim=1, largest=False).indices.reshape(len(z), -1)

    @torch.no_grad()
    def score_all(self, q: QueryBatch) -> Tensor:
        codes = self.codes(q)
        out = self.rows[codes].sum(1)
        for row in codes:
            uniq = torch.unique(row)
            self.read_rows.append(len(uniq))
            self.read_entries.append(int(self.row_nnz[uniq].sum()))
        out[:, 0] = float("-inf")
        return out


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="trained SparCode run folders")
    ap.add_argument("--probes", default="0,1,2,4,8", help="comma-separated P values (0: greedy)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    probes = [int(p) for p in a.probes.split(",")]
    out = []
    for run in a.runs:
        meta = json.loads((run / "meta.json").read_text())
        model = model_from_checkpoint(load_checkpoint(run / "checkpoint_best.pt"))
        assert isinstance(model, SparCode), f"{run} is not a SparCode run"
        ds = jobs.load(processed_root() / meta["data_hash"], 0, 0)
        own = evaluate(model, ds, SPLIT, (20, 50)).summary
        d = int(model.cfg.get("dim", 64))
        for p in probes:
            mp = MultiProbe(model, p)
            s = evaluate(mp, ds, SPLIT, (20, 50)).summary
            if p == 0 and (s["recall@20"], s["recall@50"]) != (own["recall@20"], own["recall@50"]):
                raise SystemExit(f"P = 1 differs from the model's own scores: {s} vs {own}")
            rows, entries = float(np.mean(mp.read_rows)), float(np.mean(mp.read_entries))
            cand, size = candidate_recall(mp, ds)  # the same rows: scored once per P
            rec = {
                "run": run.name,
                "probes": p,
                "recall@20": round(s["recall@20"], 4),
                "recall@50": round(s["recall@50"], 4),
                "candidate_recall": round(cand, 3),
                "set": round(size, 3),
                "rows_read": round(rows, 1),
                "entries_read": round(entries),
                "flat_madds": ds.n_items * d,
            }
            out.append(rec)
            print(json.dumps(rec), flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
