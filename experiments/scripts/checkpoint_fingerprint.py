"""What a SparCode checkpoint's quantizer and code rows compute, dumped to compare two versions of the package
bit for bit (a refactor that must change no number: experiments/results/product-quantizer-removal.md).

Dumps, for the run's first 4,000 training users (their queries from `training_queries`, as the warm start's
k-means sees them): the codes at 1 and 4 probes, 300 decoded code rows (`score_codes`), the codebooks k-means
gives from those users' tokens (`init_from`), and one training-mode forward on 1,024 tokens (ẑ, ids, commitment
loss, the codebooks after its EMA update).

    SPARCODE_HOME=<home> PYTHONPATH=<checkout>/src python experiments/scripts/checkpoint_fingerprint.py \\
        dump <run folder> <out.npz>
    python experiments/scripts/checkpoint_fingerprint.py compare <a.npz> <b.npz>
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

USERS, ROWS, TRAIN_TOKENS = 4000, 300, 1024


def dump(run: Path, out: Path) -> None:
    from sparcode_cli.data.queries import training_queries
    from sparcode_cli.data.store import load_dataset
    from sparcode_cli.models import attach_features, load_checkpoint, model_from_checkpoint
    from sparcode_cli.paths import processed_root

    torch.set_num_threads(1)
    meta = json.loads((run / "meta.json").read_text())
    ds = load_dataset(processed_root() / meta["data_hash"])
    model = model_from_checkpoint(load_checkpoint(run / "checkpoint_best.pt"))
    attach_features(model, ds.features)
    model.eval()
    q = next(training_queries(ds, int(model.cfg["max_history"]), batch=USERS))
    res: dict[str, np.ndarray] = {}
    qz = model.quantizer
    with torch.no_grad():
        z = model.user_tokens(q)
        res["codes_p1"] = qz.nearest(z, 1).numpy()
        res["codes_p4"] = qz.nearest(z, 4).numpy()
        res["rows"] = model.score_codes(torch.from_numpy(np.unique(res["codes_p4"]))[:ROWS]).numpy()
        flat = z.reshape(-1, qz.dim)
        qz.init_from(flat)
        res["kmeans_codebooks"] = qz.codebooks.numpy().copy()
        qz.train()
        zq, ids, commit = qz(flat[:TRAIN_TOKENS])
        res["train_zq"], res["train_ids"], res["train_commit"] = zq.numpy(), ids.numpy(), commit.numpy()
        res["ema_codebooks"] = qz.codebooks.numpy().copy()
    np.savez(out, **res)
    print(f"{out}: " + ", ".join(f"{k} {v.shape}" for k, v in res.items()))


def compare(a: Path, b: Path) -> bool:
    x, y = np.load(a), np.load(b)
    same = {k: k in y.files and np.array_equal(x[k], y[k]) for k in x.files}
    print(", ".join(f"{k} {'identical' if v else 'DIFFERS'}" for k, v in same.items()))
    print(f"distinct codes at 1 probe: {len(np.unique(x['codes_p1']))}")
    return all(same.values()) and set(x.files) == set(y.files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("run", type=Path)
    d.add_argument("out", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = ap.parse_args()
    if args.cmd == "dump":
        dump(args.run, args.out)
    else:
        raise SystemExit(0 if compare(args.a, args.b) else 1)


if __name__ == "__main__":
    main()
