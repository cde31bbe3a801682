"""Rejected idea (issue #11): a history-aware cut. Each code row of SparCode's warm start drops (or is lowered
by lambda x) the items that a fraction >= phi of its member users (training users with that code among their
K_u codes) already have, before the 5% row cut, so the row's budget goes to items outside its members'
histories. Every user, validation and test.

    SPARCODE_HOME=<home> .venv/bin/python experiments/scripts/history_cut_probe.py \
        <runs folder> <two-tower run id> <sparcode run id>

Prints one line per variant; the table is in experiments/results/rejected-row-content.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import scipy.sparse as sp
import torch
import waterfall as W
from quantizer_probe import run_of

from sparcode_cli.data.queries import training_queries, training_users
from sparcode_cli.metrics import evaluate

torch.set_num_threads(1)
R = Path(sys.argv[1])
tt, spr = run_of(R / sys.argv[2]), run_of(R / sys.argv[3])
ds, _ = W.load_data(str(tt.meta["data_hash"]), 0, 0)
m = W.warm_start(tt, spr, ds)
mh = int(m.cfg["max_history"])
dens = float(m.target_density)  # the run's own: 0.05
users = training_users(ds)
codes = torch.cat([m.codes(q) for q in training_queries(ds, mh)]).numpy()  # (U, K_u)
ku = codes.shape[1]
# member x code incidence (a user counts once per distinct code)
mu = sp.csr_matrix(
    (np.ones(codes.size, np.float32), (np.repeat(np.arange(len(users)), ku), codes.ravel())),
    shape=(len(users), m.n_codes),
)
mu.data[:] = 1.0
mu.sum_duplicates()
mu.data[:] = 1.0
H = ds.train.to_csr(ds.n_items + 1)[users].astype(np.float32)
H.data[:] = 1.0
members = np.asarray(mu.sum(0)).ravel()
F = (mu.T @ H).toarray() / np.maximum(members, 1)[:, None]  # (codes, items+1) fraction of members with i
print("codes used", (members > 0).sum(), "members/code", members[members > 0].mean(), flush=True)
_, side = m._all_items()
allc = torch.arange(m.n_codes)
G = torch.cat(
    [
        m._normalise_rows(
            m.interaction.table(m.interaction.code_side(m.quantizer.decode(allc[s : s + 256])), side)
        )
        for s in range(0, m.n_codes, 256)
    ]
)
Ft = torch.from_numpy(F).float()


class Rows(torch.nn.Module):
    exclude_nonpositive = True

    def __init__(s, rows):
        super().__init__()
        s.rows, s.cfg = rows, m.cfg

    @torch.no_grad()
    def score_all(s, q):
        out = s.rows[m.codes(q)].sum(1)
        out[:, 0] = float("-inf")
        return out


def cut(g, dens):
    r = torch.relu(g - m.row_thresholds(g[:, 1:], dens))
    r[:, 0] = 0
    return r


BIG = 1e3
print(
    "two-tower",
    {
        k: round(v, 4)
        for k, v in evaluate(W.trained(tt), ds, "test", (20, 50)).summary.items()
        if k in ("recall@20", "recall@50")
    },
)
for label, g in (
    [("plain", G)]
    + [(f"drop f>={phi}", G - BIG * (Ft >= phi).float()) for phi in (1.0, 0.75, 0.5, 0.25)]
    + [(f"soft lam={lam}", G - lam * Ft) for lam in (1.0, 2.0, 4.0)]
):
    rows = cut(g, dens)
    rows = torch.where(g < -BIG / 2, torch.zeros_like(rows), rows)
    mod = Rows(rows)
    v = evaluate(mod, ds, "valid", (20, 50)).summary
    t = evaluate(mod, ds, "test", (20, 50)).summary
    print(
        f"{label:16s} dens {dens}: valid {v['recall@20']:.4f} {v['recall@50']:.4f} test {t['recall@20']:.4f} {t['recall@50']:.4f}",
        flush=True,
    )
