"""Training throughput per query encoder (issue #12's speed note): samples/s of `sparcode train` for every encoder
(dnn, sasrec, gru4rec) and model (two-tower, sparcode), at 1 and at 2 torch threads, on movielens-100k.

    .venv/bin/python bench/encoder_speed.py [--steps 60] [--mirror ../shared/data] > bench/encoder_speed.md

Each cell is a fresh run of `--steps` optimiser steps of batch 512 (the trainer's samples/s: training steps only,
no evaluation), in a throwaway runs folder; SparCode quantizes from step 0
(`model.quantize_after=0`), so its steps cost what they cost after a warm start. Run it alone: the two-thread
rows need both cores. Thread counts are set before torch loads (OMP/MKL/OPENBLAS) and again through
`train.threads`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENCODERS = ("dnn", "sasrec", "gru4rec")
MODELS = ("two-tower", "sparcode")


def run(model: str, encoder: str, threads: int, steps: int, mirror: str, out: Path) -> float:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    cmd = [
        str(Path(sys.executable).parent / "sparcode"), "train", "--dataset", "movielens-100k", "--mirror", mirror,
        "--out", str(out), "--model", model, "--no-progress",
        "--set", f"model.query_encoder={encoder}", "--set", f"train.threads={threads}",
        "--set", f"train.max_steps={steps}", "--set", "train.epochs=1000",
    ]  # fmt: skip
    if model == "sparcode":
        cmd += ["--set", "model.quantize_after=0"]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    (run_dir,) = [p for p in out.iterdir() if p.name.startswith(f"{model}-")]
    res = json.loads((run_dir / "results.json").read_text())
    return float(res["samples_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--mirror", default=str(ROOT.parent / "shared" / "data"))
    a = ap.parse_args()
    rows = []
    for model in MODELS:
        for enc in ENCODERS:
            rate = {}
            for threads in (1, 2):
                with tempfile.TemporaryDirectory() as tmp:
                    rate[threads] = run(model, enc, threads, a.steps, a.mirror, Path(tmp))
            rows.append((model, enc, rate[1], rate[2]))
            print(f"{model} {enc}: {rate[1]:,.0f} / {rate[2]:,.0f} samples/s", file=sys.stderr, flush=True)
    print(
        f"Training samples/s on movielens-100k, batch 512, {a.steps} steps per cell, `bench/encoder_speed.py`.\n"
    )
    print("| model | encoder | 1 thread | 2 threads | 2 / 1 | vs two-tower dnn, 1 thread |")
    print("|---|---|---:|---:|---:|---:|")
    ref = rows[0][2]
    for model, enc, r1, r2 in rows:
        print(f"| {model} | {enc} | {r1:,.0f} | {r2:,.0f} | {r2 / r1:.2f} | {r1 / ref:.3f} |")


if __name__ == "__main__":
    main()
