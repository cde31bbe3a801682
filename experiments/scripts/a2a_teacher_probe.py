"""SparCode distilled from the all-to-all ceiling instead of the two-tower: a prototype, patched in by this script
(the package's teacher is the frozen two-tower the warm start copied, models/teacher.py), measured against the
target matrix's runs.

The one change: `SparCode.teacher_logits` returns the logits of the trained all-to-all run that started from the
same two-tower run (the target matrix's, same seed, its best checkpoint, frozen, eval mode). With `--scale
two-tower` (the default) they are rescaled per row to the two-tower teacher's spread (std over the row's positive
and negatives), so only the teacher's ranking changes, not the sharpness of its softmax; with `--scale raw` they
are the all-to-all's own (`distill_loss` then rescales the student to them, as before). `--scale control` loads
and runs the all-to-all but returns the two-tower's logits: its runs must equal the default runs to the digit,
which shows that the patch changes nothing but the teacher (the all-to-all is built under a forked RNG). Everything
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

import json
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patched_training import parser, report, train_all, worker  # noqa: E402
from sparcode_ablation import target_sets  # noqa: E402

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
        # built under a forked RNG, as the package's teacher is: building a model draws initial weights, and the
        # student's run must keep its own random stream (probe items, dropout) so that only the teacher differs
        with torch.random.fork_rng(devices=[]):
            ckpt = load_checkpoint(Path(os.environ["A2A_TEACHER"]) / "checkpoint_best.pt")
            _A2A["m"] = model_from_checkpoint(ckpt).to(dev).eval().requires_grad_(False)
    a2a = _A2A["m"]  # kept in eval mode: no dropout, never trained
    with torch.no_grad():
        out = a2a.train_output(q, pos, neg)
        t = torch.cat([out.pos_logits.unsqueeze(1), out.neg_logits], 1)
    if os.environ.get("A2A_SCALE") == "raw":
        return t
    if os.environ.get("A2A_SCALE") == "control":
        return tt  # the all-to-all ran and is ignored: must reproduce the default run to the digit
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


def main() -> None:
    if worker(lambda: setattr(SparCode, "teacher_logits", teacher_logits)):
        return
    ap = parser(__doc__)
    ap.add_argument(
        "--scale",
        choices=("two-tower", "raw", "control"),
        default="two-tower",
        help="the teacher's logits rescaled per row to the two-tower teacher's std, or as the all-to-all has them; "
        "control: the all-to-all runs but the two-tower's logits are returned (must reproduce the default runs)",
    )
    a = ap.parse_args()
    a2as: dict[int, Path] = {}

    def tag_env(seed: int, tt: Path) -> tuple[str, dict[str, str]]:
        a2as[seed] = all_to_all_of(a.runs, tt)
        return f"{a2as[seed].name} {a.scale}", {"A2A_TEACHER": str(a2as[seed]), "A2A_SCALE": a.scale}

    tts, seeds, new, ref = train_all(__file__, a, "A2A_TEACHER", tag_env)
    teachers = [a2as[s] for s in seeds]
    print(f"{a.dataset}, {a.encoder}, seeds {seeds}; every run: {' '.join(target_sets(a.dataset, 'sparcode'))}; teachers: "
          + ", ".join(t.name for t in teachers) + "\n")  # fmt: skip
    report(
        "teacher",
        [("two-tower teacher (default)", ref), (f"all-to-all teacher ({a.scale} scale)", new)],
        [("two-tower", [tts[s] for s in seeds]), ("all-to-all", teachers)],
        seeds,
        also=[("all-to-all itself", teachers)],
    )


if __name__ == "__main__":
    main()
