"""Training with the served probes inside the loss: a prototype, patched in by this script (the package trains
on one code per token and serves `model.probes` codes per token), measured against the target matrix's runs.

With `--train-probes P`, each user token's P nearest codes (`ProductQuantizer.nearest`, the beam of serving) all
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

import argparse
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sparcode_ablation import (  # noqa: E402
    BUDGET,
    best,
    chosen_seeds,
    compare,
    expected_id,
    overrides,
    two_tower_runs,
)

from sparcode_cli.models.base import QueryBatch, TrainOutput  # noqa: E402
from sparcode_cli.models.sparcode import SparCode, leaky_cut  # noqa: E402
from sparcode_cli.training.trainer import run_state  # noqa: E402


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


def train_one(tt: Path, sets: list[str], dataset: str, out: Path, p: int) -> Path:
    rid = expected_id(tt, sets, dataset)
    marker = out / rid / "TRAIN_PROBES"
    if marker.is_file() and marker.read_text().strip() == str(p) and run_state(out / rid) == "finished":
        return out / rid  # this script's finished run, at this P, by this code
    if (out / rid).exists():
        raise SystemExit(
            f"{out / rid} exists and is not this script's finished run at P = {p}: use a new --out"
        )
    cmd = [sys.executable, __file__, "--one", "--", "train", "--dataset", dataset, "--model", "sparcode",
           "--init-from", str(tt), "--out", str(out), *(a for s in sets for a in ("--set", s)), "--no-progress"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TRAIN_PROBES=str(p))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0 or not (out / rid / "results.json").is_file():
        raise SystemExit(f"failed (rc {r.returncode}, run {rid}): {' '.join(cmd)}\n{r.stderr[-2000:]}")
    (out / rid / "TRAIN_PROBES").write_text(f"{p}\n")
    return out / rid


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":  # a worker: `sparcode ...` with the patch
        from sparcode_cli.commands.app import main as cli

        SparCode.train_output = train_output  # type: ignore[method-assign]
        cli(sys.argv[3:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, type=Path)
    ap.add_argument("--dataset", default="movielens-100k")
    ap.add_argument("--encoder", default="dnn")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--train-probes", type=int, default=4)
    ap.add_argument("--seeds", help="comma-separated subset of the seeds (default: all)")
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    tts = two_tower_runs(a.runs, a.dataset, a.encoder)
    seeds = chosen_seeds(tts, a.seeds, a.runs, a.encoder)
    a.out.mkdir(parents=True, exist_ok=True)
    sets = {s: overrides(s, a.encoder, "model.probes", "4", []) for s in seeds}
    with ThreadPoolExecutor(a.jobs) as pool:
        fut = {s: pool.submit(train_one, tts[s], sets[s], a.dataset, a.out, a.train_probes) for s in seeds}
        new = [fut[s].result() for s in seeds]
    ref = [a.runs / expected_id(tts[s], sets[s], a.dataset) for s in seeds]
    if stale := [r.name for r in ref if run_state(r) != "finished"]:
        raise SystemExit(f"no finished default SparCode run of this code in {a.runs}: {', '.join(stale)}")
    print(f"{a.dataset}, {a.encoder}, seeds {seeds}; every run: {' '.join(BUDGET)} model.probes=4\n")
    print("| training reads | best epoch per seed | valid R@20 | valid R@50 | test R@20 | test R@50 | "
          "vs 1 code: ΔR@20 / ΔR@50 | vs two-tower: ΔR@20 / ΔR@50 |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---|---|")
    for label, runs in (("1 code per token (default)", ref), (f"{a.train_probes} codes per token", new)):
        rows = [best(r) for r in runs]
        ms = {
            k: f"{np.mean([r[k] for r in rows]):.4f}" for k in ("valid", "valid50", "recall@20", "recall@50")
        }
        vs = "–" if runs is ref else " / ".join(compare(runs, ref, m) for m in ("recall@20", "recall@50"))
        vt = " / ".join(compare(runs, [tts[s] for s in seeds], m) for m in ("recall@20", "recall@50"))
        ep = ", ".join(str(int(r["epoch"])) for r in rows)
        print(
            f"| {label} | {ep} | {ms['valid']} | {ms['valid50']} | {ms['recall@20']} | {ms['recall@50']} | {vs} | {vt} |"
        )
    print("\nPer seed (valid R@20 / valid R@50 / test R@20 / test R@50):")
    for label, runs in (("1 code", ref), (f"{a.train_probes} codes", new)):
        cells = [
            " / ".join(f"{best(r)[k]:.4f}" for k in ("valid", "valid50", "recall@20", "recall@50"))
            for r in runs
        ]
        print(f"- {label}: " + "; ".join(f"seed {s}: {c}" for s, c in zip(seeds, cells, strict=True)))


if __name__ == "__main__":
    main()
