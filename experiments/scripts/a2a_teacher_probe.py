"""SparCode distilled from the all-to-all ceiling instead of the two-tower: a prototype, patched in by this script
(the package's teacher is the frozen two-tower the warm start copied, models/teacher.py), measured against the
target matrix's runs.

The one change: `SparCode.teacher_logits` returns the logits of the trained all-to-all run that started from the
same two-tower run (the target matrix's, same seed, its best checkpoint, frozen, eval mode). With `--scale
two-tower` (the default) they are rescaled per row to the two-tower teacher's spread (std over the row's positive
and negatives), so only the teacher's ranking changes, not the sharpness of its softmax; with `--scale raw` they
are the all-to-all's own (`distill_loss` then rescales the student to them, as before). Everything
else is the package's training. For each two-tower run of --encoder in --runs, SparCode is trained from it with
the target matrix's budget (400 steps, `train.epochs=1000`, its seed) into --out, a folder of its own: the runs'
ids (and the code digest in their meta.json) are the default config's, so they must not mix with unpatched runs.
Each gets an `A2A_TEACHER` marker file naming the teacher run and the scale, and only a marked, finished run is reused. The
table compares them with the same-seed default SparCode runs of --runs and with the two-tower, as
sparcode_ablation.py does.

    SPARCODE_HOME=<home> .venv/bin/python experiments/scripts/a2a_teacher_probe.py \\
        --runs <the target matrix's runs> --encoder dnn --seeds 0,1,2 --out <new folder>
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
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

from sparcode_cli.models import load_checkpoint, model_from_checkpoint  # noqa: E402
from sparcode_cli.models.base import QueryBatch  # noqa: E402
from sparcode_cli.models.sparcode import SparCode  # noqa: E402
from sparcode_cli.training.trainer import run_state  # noqa: E402

_A2A: dict[str, torch.nn.Module] = {}


def teacher_logits(self: SparCode, q: QueryBatch, pos: Tensor, neg: Tensor) -> Tensor:
    """(B, 1 + S): the all-to-all run's training logits, rescaled per row to the two-tower teacher's std."""
    assert self.teacher is not None
    tt = self.teacher.logits(q, pos, neg)
    dev = pos.device
    if "m" not in _A2A:
        m = model_from_checkpoint(load_checkpoint(Path(os.environ["A2A_TEACHER"]) / "checkpoint_best.pt"))
        _A2A["m"] = m.to(dev).eval().requires_grad_(False)
    a2a = _A2A["m"]
    was = a2a.training
    a2a.eval()  # never dropout: a frozen teacher
    with torch.no_grad():
        out = a2a.train_output(q, pos, neg)
        t = torch.cat([out.pos_logits.unsqueeze(1), out.neg_logits], 1)
    a2a.train(was)
    if os.environ.get("A2A_SCALE") == "raw":
        return t
    return (t - t.mean(1, keepdim=True)) * (tt.std(1, keepdim=True) / (t.std(1, keepdim=True) + 1e-6))


def all_to_all_of(runs: Path, tt: Path) -> Path:
    """The all-to-all run of --runs warm-started from two-tower run `tt` (the target matrix's, one per seed)."""
    found = [
        r
        for r in sorted(runs.glob("all-to-all-*"))
        if (r / "meta.json").is_file()
        and Path(str(json.loads((r / "meta.json").read_text()).get("init_from") or "")).name == tt.name
        and run_state(r) == "finished"
    ]
    if len(found) != 1:
        raise SystemExit(f"expected one finished all-to-all run from {tt.name} in {runs}, found {len(found)}")
    return found[0]


def train_one(tt: Path, a2a: Path, sets: list[str], dataset: str, out: Path, scale: str) -> Path:
    rid = expected_id(tt, sets, dataset)
    marker = out / rid / "A2A_TEACHER"
    tag = f"{a2a.name} {scale}"
    if marker.is_file() and marker.read_text().strip() == tag and run_state(out / rid) == "finished":
        return out / rid  # this script's finished run with this teacher
    if (out / rid).exists():
        raise SystemExit(f"{out / rid} exists and is not this script's finished run: use a new --out")
    cmd = [sys.executable, __file__, "--one", "--", "train", "--dataset", dataset, "--model", "sparcode",
           "--init-from", str(tt), "--out", str(out), *(a for s in sets for a in ("--set", s)), "--no-progress"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", A2A_TEACHER=str(a2a), A2A_SCALE=scale)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0 or not (out / rid / "results.json").is_file():
        raise SystemExit(f"failed (rc {r.returncode}, run {rid}): {' '.join(cmd)}\n{r.stderr[-2000:]}")
    marker.write_text(f"{tag}\n")
    return out / rid


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":  # a worker: `sparcode ...` with the patch
        from sparcode_cli.commands.app import main as cli

        SparCode.teacher_logits = teacher_logits  # type: ignore[method-assign]
        cli(sys.argv[3:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, type=Path)
    ap.add_argument("--dataset", default="movielens-100k")
    ap.add_argument("--encoder", default="dnn")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seeds", help="comma-separated subset of the seeds (default: all)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument(
        "--scale",
        choices=("two-tower", "raw"),
        default="two-tower",
        help="the teacher's logits rescaled per row to the two-tower teacher's std, or as the all-to-all has them",
    )
    a = ap.parse_args()
    tts = two_tower_runs(a.runs, a.dataset, a.encoder)
    seeds = chosen_seeds(tts, a.seeds, a.runs, a.encoder)
    a.out.mkdir(parents=True, exist_ok=True)
    sets = {s: overrides(s, a.encoder, "model.probes", "4", []) for s in seeds}
    a2as = {s: all_to_all_of(a.runs, tts[s]) for s in seeds}
    with ThreadPoolExecutor(a.jobs) as pool:
        fut = {s: pool.submit(train_one, tts[s], a2as[s], sets[s], a.dataset, a.out, a.scale) for s in seeds}
        new = [fut[s].result() for s in seeds]
    ref = [a.runs / expected_id(tts[s], sets[s], a.dataset) for s in seeds]
    if stale := [r.name for r in ref if run_state(r) != "finished"]:
        raise SystemExit(f"no finished default SparCode run of this code in {a.runs}: {', '.join(stale)}")
    print(f"{a.dataset}, {a.encoder}, seeds {seeds}; every run: {' '.join(BUDGET)}; teachers: "
          + ", ".join(a2as[s].name for s in seeds) + "\n")  # fmt: skip
    print("| teacher | best epoch per seed | valid R@20 | valid R@50 | test R@20 | test R@50 | "
          "vs two-tower teacher: ΔR@20 / ΔR@50 | vs two-tower: ΔR@20 / ΔR@50 | vs all-to-all: ΔR@20 / ΔR@50 |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---|---|---|")
    for label, runs in (("two-tower (default)", ref), (f"all-to-all ({a.scale} scale)", new)):
        rows = [best(r) for r in runs]
        ms = {
            k: f"{np.mean([r[k] for r in rows]):.4f}" for k in ("valid", "valid50", "recall@20", "recall@50")
        }
        vs = "–" if runs is ref else " / ".join(compare(runs, ref, m) for m in ("recall@20", "recall@50"))
        vt = " / ".join(compare(runs, [tts[s] for s in seeds], m) for m in ("recall@20", "recall@50"))
        va = " / ".join(compare(runs, [a2as[s] for s in seeds], m) for m in ("recall@20", "recall@50"))
        ep = ", ".join(str(int(r["epoch"])) for r in rows)
        print(
            f"| {label} | {ep} | {ms['valid']} | {ms['valid50']} | {ms['recall@20']} | {ms['recall@50']} | {vs} | {vt} | {va} |"
        )
    print("\nPer seed (valid R@20 / valid R@50 / test R@20 / test R@50):")
    for label, runs in (
        ("two-tower teacher", ref),
        ("all-to-all teacher", new),
        ("all-to-all itself", [a2as[s] for s in seeds]),
    ):
        cells = [
            " / ".join(f"{best(r)[k]:.4f}" for k in ("valid", "valid50", "recall@20", "recall@50"))
            for r in runs
        ]
        print(f"- {label}: " + "; ".join(f"seed {s}: {c}" for s, c in zip(seeds, cells, strict=True)))


if __name__ == "__main__":
    main()
