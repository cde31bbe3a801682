"""How often a test user's codes are the codes of its training-time query (the test query adds the validation
items). `SPARCODE_HOME=<home> .venv/bin/python experiments/scripts/code_shift_probe.py <runs> <two-tower run id>
<sparcode run id>`; used in experiments/results/rejected-row-content.md."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
import waterfall as W
from quantizer_probe import run_of

from sparcode_cli.data.queries import history_queries

torch.set_num_threads(1)
R = Path(sys.argv[1])
tt, spr = run_of(R / sys.argv[2]), run_of(R / sys.argv[3])
ds, _ = W.load_data(str(tt.meta["data_hash"]), 0, 0)
m = W.warm_start(tt, spr, ds)
mh = int(m.cfg["max_history"])
es = ds.test
tr = torch.cat([m.codes(q) for q in history_queries(ds, ds.train, es.users, mh, rows=es.users)]).numpy()
te = torch.cat([m.codes(q) for q in history_queries(ds, es.query, es.users, mh)]).numpy()
same_set = np.mean([set(a) == set(b) for a, b in zip(tr, te, strict=True)])
overlap = np.mean([len(set(a) & set(b)) / len(set(b)) for a, b in zip(tr, te, strict=True)])
print(
    f"test users {len(te)}: same code set {same_set:.3f}, mean share of test codes among training codes {overlap:.3f}"
)
