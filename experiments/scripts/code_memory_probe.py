"""Rejected idea (issue #11): code memory. Each code row of SparCode's Gowalla warm start gets a bonus for the
items its member users (training users quantized to that code) have in their training histories, beta x
log1p(count) or beta x count / members, before the 5% row cut; the user's own items are masked at ranking, so
only co-members' items can gain. Ranked on the 2,000-user validation and test samples.

    SPARCODE_HOME=<home> .venv/bin/python experiments/scripts/code_memory_probe.py \
        <two-tower run folder> <sparcode run folder> [sample users, default 2000]

Prints one line per (form, beta); the table is in experiments/results/rejected-row-content.md.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import scipy.sparse as sp
import torch
import waterfall as W
from quantizer_probe import run_of

from sparcode_cli.data.queries import training_queries, training_users
from sparcode_cli.metrics import evaluate

torch.set_num_threads(2)
tt, spr = run_of(Path(sys.argv[1])), run_of(Path(sys.argv[2]))
sample = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
ds, _ = W.load_data(str(tt.meta["data_hash"]), sample, 0)
m = W.warm_start(tt, spr, ds)
mh = int(m.cfg["max_history"])
dens = float(m.target_density)  # the run's own: 0.05
users = training_users(ds)
codes = torch.cat([m.codes(q)[:, 0] for q in training_queries(ds, mh)]).numpy()
code_of = np.zeros(ds.n_users + 1, dtype=np.int64)
code_of[users] = codes
lens = ds.train.lengths()
rows = np.repeat(code_of[users], lens[users])
cols = np.concatenate([ds.train.row(u) for u in users])
C = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(m.n_codes, ds.n_items + 1))
C.sum_duplicates()
size = np.bincount(codes, minlength=m.n_codes)
print("codes used", (size > 0).sum(), "mean members", size[size > 0].mean(), flush=True)
_, side = m._all_items()


class Mem(torch.nn.Module):
    exclude_nonpositive = True

    def __init__(s, beta, density, norm):
        super().__init__()
        s.beta, s.density, s.norm, s.cfg = beta, density, norm, m.cfg

    @torch.no_grad()
    def score_all(s, q):
        c = m.codes(q)[:, 0]
        g = m._normalise_rows(m.interaction.table(m.interaction.code_side(m.quantizer.decode(c)), side))
        cnt = torch.from_numpy(C[c.numpy()].toarray())
        if s.norm == "log":
            g = g + s.beta * torch.log1p(cnt)
        elif s.norm == "frac":
            g = g + s.beta * cnt / torch.from_numpy(np.maximum(size[c.numpy()], 1)).float().unsqueeze(1)
        g = g - m.row_thresholds(g[:, 1:], s.density)
        out = torch.relu(g)
        out[:, 0] = float("-inf")
        return out


for norm, beta in [("log", 0.0)] + [(n, b) for n in ("log", "frac") for b in (0.5, 1.0, 2.0, 4.0)]:
    t0 = time.time()
    mod = Mem(beta, dens, norm)
    v = evaluate(mod, ds, "valid", (20, 50)).summary
    t = evaluate(mod, ds, "test", (20, 50)).summary
    print(
        f"{norm} beta={beta} dens={dens}: valid {v['recall@20']:.4f} {v['recall@50']:.4f} test {t['recall@20']:.4f} {t['recall@50']:.4f} ({time.time() - t0:.0f}s)",
        flush=True,
    )
two = W.trained(tt)
v = evaluate(two, ds, "valid", (20, 50)).summary
t = evaluate(two, ds, "test", (20, 50)).summary
print(
    f"two-tower: valid {v['recall@20']:.4f} {v['recall@50']:.4f} test {t['recall@20']:.4f} {t['recall@50']:.4f}"
)
