"""Split a `py-spy record --format raw` profile of `sparcode train` into the training loop's stages.

    SPARCODE_HOME=<home> OMP_NUM_THREADS=1 .venv/bin/py-spy record -r 50 --format raw -o prof.txt -- \\
        .venv/bin/sparcode train --dataset gowalla --model two-tower --out <runs> <recipe --set ...> \\
        --set train.max_steps=300 --set train.epochs=1000 --set train.threads=1 --no-progress
    .venv/bin/python bench/profile_stages.py prof.txt

A sample goes to the first stage whose pattern its stack matches (the loop's backward and optimizer lines are
matched by their line in trainer.py, so they are looked up in the source rather than hard-coded). Prints each
stage's share of all samples and of the training steps alone (forward, loss, backward, optimizer, sampler).
"""

from __future__ import annotations

import collections
import re
import sys
from pathlib import Path

TRAINER = Path(__file__).resolve().parents[1] / "src" / "sparcode_cli" / "training" / "trainer.py"


def loop_line(code: str) -> int:
    """The line of the training loop's `code` statement in trainer.py."""
    for no, text in enumerate(TRAINER.read_text().splitlines(), 1):
        if text.strip() == code:
            return no
    raise SystemExit(f"{code!r} not found in {TRAINER}")


def stages() -> list[tuple[str, str, bool]]:
    """(stage, stack pattern, part of a training step)"""
    return [
        ("evaluation (validation and test ranking)", r"run_eval|_final_eval|evaluate \(", False),
        ("sampler (batch and negatives)", r"sampler\.py|accidental_hits", True),
        ("backward", rf"_train_locked \(.*trainer\.py:{loop_line('loss.backward()')}\)", True),
        ("optimizer step (AdamW)", rf"_train_locked \(.*trainer\.py:{loop_line('opt.step()')}\)", True),
        ("loss", r"sampled_softmax_loss", True),
        ("forward (model)", r"train_output|forward \(", True),
        ("data loading and set-up", r"load_dataset|_read|<module>", False),
    ]


def main(path: str) -> None:
    rules = stages()
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, n = line.rsplit(" ", 1)
        total += int(n)
        name = next((s for s, pat, _ in rules if re.search(pat, stack)), "other")
        counts[name] += int(n)
    step_total = sum(counts[s] for s, _, step in rules if step)
    print("| stage | samples | share of all | share of the training steps |")
    print("|---|---:|---:|---:|")
    for name, n in counts.most_common():
        step = next((st for s, _, st in rules if s == name), False)
        share = f"{100 * n / step_total:.0f}%" if step else "–"
        print(f"| {name} | {n:,} | {100 * n / total:.1f}% | {share} |")
    print(f"\n{total:,} samples in all, {step_total:,} in training steps.")


if __name__ == "__main__":
    main(sys.argv[1])
