"""Issue #11: why all-to-all serves its warm start on Gowalla. One seed, one change at a time from the target
matrix's all-to-all (its Gowalla keys, 400 steps, validation and test on the matrix's 2,000-user sample).

    OMP_NUM_THREADS=1 .venv/bin/python \
        experiments/scripts/gowalla_all_to_all_probe.py --two-tower <runs>/two-tower-gowalla-... \
        --processed <SPARCODE_HOME>/processed/gowalla-93468f17600b \
        --out <folder> NAME [KEY=VALUE ...]

Trains one all-to-all run from the given two-tower run (`--init-from`) with the extra overrides and prints its
train.log (validation Recall@20 at the warm start and after 400 steps), the served checkpoint's test metrics and
the last step's (the checkpoint validation would reject).
`--encoder-lr-scale S` trains everything but the cross network h (encoders, token heads) at S x train.lr (0:
frozen, h alone learns); `--center-h` subtracts from h(z, t) its value at the mean training-user token,
h(z̄, t), so h cannot hold a score that depends on the item alone. Levers measured here, not package options.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import torch
from rich.console import Console

from sparcode_cli.config import load_config
from sparcode_cli.metrics import evaluate
from sparcode_cli.models import attach_features, load_checkpoint, model_from_checkpoint
from sparcode_cli.models.all_to_all import AllToAll
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
    p.add_argument("--encoder-lr-scale", type=float, default=None, help="lr of all but h, x train.lr")
    p.add_argument("--center-h", action="store_true", help="h(z, t) - h(z̄, t), z̄ the mean user token")
    a = p.parse_args()
    torch.set_num_threads(1)
    ds = load(a.processed, SAMPLE, SAMPLE_SEED)
    if a.encoder_lr_scale is not None or a.center_h:
        record_models()
    if a.encoder_lr_scale is not None:
        scale_encoder_lr(a.encoder_lr_scale)
    if a.center_h:
        center_h(ds)
    cfg = load_config("all-to-all", overrides=[*MATRIX_KEYS, *a.overrides])
    res = train(ds, cfg, a.out / a.name, console=Console(file=io.StringIO()), progress=False,
                init_from=a.two_tower)  # fmt: skip
    keep = ("recall@20", "recall@50", "ndcg@20")
    print(a.name, a.overrides, json.dumps({k: round(float(v), 4) for k, v in res.test.items() if k in keep}))
    # the last step's model on test too: validation serves the warm start; does test agree that training hurt?
    last = model_from_checkpoint(load_checkpoint(res.run_dir / "checkpoint_last.pt"))
    attach_features(last, ds.features)
    t = evaluate(last, ds, "test", (20, 50), batch_size=2048).summary
    print("last step, test:", json.dumps({k: round(float(v), 4) for k, v in t.items() if k in keep}))
    print(h_profile(last, ds))
    print((res.run_dir / "train.log").read_text())


def h_profile(m: AllToAll, ds, users: int = 500) -> str:  # noqa: ANN001
    """What h (the cross network) adds on top of the dot path, on the first `users` test users: its share that
    depends on the item alone, and how that share ranks against the items' training popularity."""
    import numpy as np
    from scipy.stats import spearmanr

    from sparcode_cli.data.queries import history_queries

    q = next(history_queries(ds, ds.test.query, ds.test.users[:users], 50, batch=users))
    n = len(q)
    with torch.no_grad():
        z = m.user_tokens(q).reshape(-1, m.token_dim)
        _, side = m._all_items()
        full = m.interaction.table_chunked(z, side).reshape(n, m.k_u, -1).sum(1)[:, 1:].numpy()
        dot = (z @ side.tsum.T / m.interaction.tau).reshape(n, m.k_u, -1).sum(1)[:, 1:].numpy()
    h, pop = full - dot, ds.item_counts()[1:].astype(float)
    per_item = h.mean(0)
    rho = spearmanr(per_item, pop).statistic  # counts tie a lot: average ranks
    top20 = lambda s: np.argpartition(-s, 20, axis=1)[:, :20]  # noqa: E731
    return (
        f"h: std over items {h.std(1).mean():.2f} (dot path {dot.std(1).mean():.2f}); item-only share of its "
        f"variance {per_item.var() / h.var():.2f}; Spearman(item-only h, training count) {rho:+.3f}; median "
        f"training count of the top 20 (history not masked): dot alone {np.median(pop[top20(dot)]):.0f}, "
        f"dot + h {np.median(pop[top20(dot + h)]):.0f}"
    )


def center_h(ds) -> None:  # noqa: ANN001
    """Patch Interaction.table / paired of every all-to-all to h(z, t) - h(z̄, t); z̄ is the mean of every
    training user's K_u tokens, taken once at the first call after the warm start (h is 0 there) and kept: with
    trainable encoders the tokens drift away from it."""
    from sparcode_cli.data.queries import training_queries
    from sparcode_cli.models.interaction import CodeSide, Interaction, ItemSide

    zbar: list[torch.Tensor] = []
    table, paired = Interaction.table, Interaction.paired

    def h_ref(self: Interaction, it: ItemSide) -> torch.Tensor:
        if not zbar:
            m = MODELS[-1]
            # the first call comes from evaluation's inference mode: z̄ must be a normal tensor
            with torch.inference_mode(False), torch.no_grad():
                toks = [m.user_tokens(q).reshape(-1, m.token_dim) for q in training_queries(ds, 50)]
                zbar.append(torch.cat(toks).mean(0, keepdim=True))
        z = zbar[0]
        return table(self, self.code_side(z), it)[0] - (z @ it.tsum.T)[0] / self.tau  # (n,)

    def centered_table(self: Interaction, c: CodeSide, it: ItemSide) -> torch.Tensor:
        return table(self, c, it) - h_ref(self, it)[None, :]

    def centered_paired(self: Interaction, c: CodeSide, it: ItemSide) -> torch.Tensor:
        return paired(self, c, it) - h_ref(self, it)[:, None]

    Interaction.table, Interaction.paired = centered_table, centered_paired  # type: ignore[method-assign]


MODELS: list[AllToAll] = []


def record_models() -> None:
    """Every AllToAll built from now on is appended to MODELS (the trainer builds it; the patches need it)."""
    init = AllToAll.__init__

    def recording_init(self: AllToAll, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        init(self, *args, **kwargs)
        MODELS.append(self)

    AllToAll.__init__ = recording_init  # type: ignore[method-assign]


def scale_encoder_lr(scale: float) -> None:
    """The trainer builds one AdamW over model.parameters(); split it into h at lr and the rest at scale x lr."""
    adamw = torch.optim.AdamW

    def grouped(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:  # noqa: ANN001
        h = {id(q) for q in MODELS[-1].interaction.parameters()}
        params = list(params)
        groups = [
            {"params": [q for q in params if id(q) in h], "lr": lr},
            {"params": [q for q in params if id(q) not in h], "lr": lr * scale},
        ]
        return adamw(groups, lr=lr, weight_decay=weight_decay)

    torch.optim.AdamW = grouped  # type: ignore[misc,assignment]


if __name__ == "__main__":
    main()
