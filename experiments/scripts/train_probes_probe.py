"""Training with the served probes inside the loss: a prototype, patched in by this script (the package trains
on one code per token and serves `model.probes` codes per token), measured against the target matrix's runs.

With `--train-probes P`, each user token's P nearest codes (`ResidualQuantizer.nearest`, the beam of serving) all
enter the training loss: K_u x P rows per user, each with the straight-through gradient z + sg(ẑ_p - z), cut and
summed exactly as serving sums them. The codebooks still learn (EMA, commitment) from the greedy code only.
Everything else is `SparCode.train_output` unchanged. For each two-tower run of --encoder in --runs, SparCode is
trained from it with the target matrix's budget (400 steps, `train.epochs=1000`, its seed) into --out, a
folder of its own: the runs' ids (and the code digest in their meta.json) are the default config's, so they must
not mix with unpatched runs. Each gets a `TRAIN_PROBES` marker file, and only a marked, finished run is reused.
The table compares them with the same-seed SparCode runs of --runs (the default, trained on one code) and with
the two-tower, as sparcode_ablation.py does.

    SPARCODE_HOME=<home> .venv/bin/python experiments/scripts/train_probes_probe.py \\
        --runs <the target matrix's runs> --encoder dnn --seeds 0,1,2 --out <new folder> --train-probes 4
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patched_training import parser, report, train_all, worker  # noqa: E402
from sparcode_ablation import target_sets  # noqa: E402

from sparcode_cli.models.base import QueryBatch, TrainOutput  # noqa: E402
from sparcode_cli.models.sparcode import SparCode, leaky_cut  # noqa: E402


def train_output(self: SparCode, q: QueryBatch, pos: Tensor, neg: Tensor) -> TrainOutput:
    """SparCode.train_output with each token's `train_probes` nearest codes as K_u x P rows."""
    p = int(os.environ["TRAIN_PROBES"])
    b_size = len(pos)
    z = self.user_tokens(q)  # (B, K_u, D)
    if int(self.n_steps) < self.quantize_after:
        zq, commit, k = z, z.new_zeros(()), self.k_u
    else:
        # the probes' vectors from the codebooks as they are before this batch's EMA update and restarts, as
        # the greedy code's own ẑ is inside the quantizer's forward
        vec = self.quantizer.decode(self.quantizer.nearest(z, p)) if p > 1 else None  # (B, K_u, P, D)
        zq, _, commit = self.quantizer(z)  # codebook learning from the greedy code, as before
        k = self.k_u
        if vec is not None:
            zq = (z.unsqueeze(2) + (vec - z.unsqueeze(2)).detach()).reshape(b_size, -1, self.token_dim)
            k = self.k_u * p
    c = self.interaction.code_side(zq.reshape(-1, self.token_dim))
    t = self.tokens_of(torch.cat([pos, neg]))
    it = self.interaction.item_side(t)
    it_pos, it_neg = it[:b_size], it[b_size:]
    g_neg = self.interaction.table(c, it_neg)
    g_pos = self.interaction.paired(c.rows(b_size, k), it_pos)
    probe = torch.randint(1, self.ctx.n_items + 1, (self.density_items,), device=pos.device)
    g_probe = self.interaction.table(c, self.interaction.item_side(self.tokens_of(probe)))
    mu = g_probe.mean(1, keepdim=True)
    sd = g_probe.std(1, keepdim=True) + self.STD_EPS
    g_probe = (g_probe - mu) / sd
    g_neg = (g_neg - mu) / sd
    g_pos = (g_pos - mu.reshape(b_size, k)) / sd.reshape(b_size, k)
    with torch.no_grad():
        row_b = -self.row_thresholds(g_probe.detach(), self.current_target())
        self._batch_density = float((g_probe.detach() + row_b > 0).float().mean())
    x_neg = g_neg + row_b
    x_pos = g_pos + row_b.reshape(b_size, k)
    scale = self.log_logit_scale.clamp(max=math.log(100.0)).exp()
    neg_logits = scale * F.relu(x_neg).reshape(b_size, k, -1).sum(1)
    pos_logits = scale * leaky_cut(x_pos, self.leak_slope()).sum(1)
    aux = commit
    if self.has_teacher():
        dense = torch.cat([g_pos.sum(1, keepdim=True), g_neg.reshape(b_size, k, -1).sum(1)], 1)
        aux = aux + self.distill * self.distill_loss(dense, self.teacher_logits(q, pos, neg))
    return TrainOutput(pos_logits, neg_logits, aux)


def main() -> None:
    if worker(lambda: setattr(SparCode, "train_output", train_output)):
        return
    ap = parser(__doc__)
    ap.add_argument("--train-probes", type=int, default=4)
    a = ap.parse_args()
    p = str(a.train_probes)
    tts, seeds, new, ref = train_all(__file__, a, "TRAIN_PROBES", lambda s, tt: (p, {"TRAIN_PROBES": p}))
    print(
        f"{a.dataset}, {a.encoder}, seeds {seeds}; every run: {' '.join(target_sets(a.dataset, 'sparcode'))}\n"
    )
    report(
        "training reads",
        [("1 code per token (default)", ref), (f"{a.train_probes} codes per token", new)],
        [("two-tower", [tts[s] for s in seeds])],
        seeds,
    )


if __name__ == "__main__":
    main()
