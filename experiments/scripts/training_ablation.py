"""SparCode training ablation on movielens-100k (dnn encoder, mlp interaction), 3 seeds.

Runs the two-tower warm starts (1000 steps), then SparCode (400 steps) from each, with the defaults and one
change at a time (each variant restores one earlier default or removes one mechanism), 2 processes at a time, 1 thread each; writes a JSON summary (collect with the --collect step).

    SPARCODE_HOME=<home> python experiments/scripts/training_ablation.py --runs <runs> --mirror <data> \
        --summary <runs>/ablation_summary.json [--variants default,b,c,...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

SPARCODE = str(Path(sys.executable).parent / "sparcode")
COMMON = ["--set", "train.epochs=1000", "--set", "train.threads=1", "--no-progress"]
VARIANTS = {
    "default": [],
    # "a", model.quantizer=product: lost (the summary of movielens-100k-sparcode-warm-start.md has it); removed
    "b": ["model.logit_scale=5.0"],
    "c": ["train.lr=0.001"],
    "d": ["model.leak=0"],
    "e": ["model.target_density=1.0"],
    "f": ["train.max_steps=1500"],
    "g": ["model.head_noise=0.5"],
}


def run_cmd(cmd: list[str], log: Path, runs: Path) -> Path:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    t0 = time.time()
    with open(log, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        p = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    text = log.read_text()
    if p.returncode != 0:
        raise RuntimeError(f"failed ({p.returncode}): {log}")
    ids = re.findall(r"((?:two-tower|sparcode)-movielens-100k-[0-9a-f]{8})", text)
    if not ids:
        raise RuntimeError(f"no run id in {log}")
    folder = runs / ids[-1]
    with open(log, "a") as fh:
        fh.write(f"\n# wall {time.time() - t0:.1f}s folder {folder}\n")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=Path, required=True)
    ap.add_argument("--mirror", required=True)
    ap.add_argument("--summary", type=Path, required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    a.runs.mkdir(parents=True, exist_ok=True)
    logs = a.runs / "logs"
    logs.mkdir(exist_ok=True)
    seeds = [int(s) for s in a.seeds.split(",")]
    variants = a.variants.split(",")
    summary: dict = {"two_tower": {}, "sparcode": {}}
    if a.summary.exists():
        summary = json.loads(a.summary.read_text())
    lock = threading.Lock()
    tt_done = {s: threading.Event() for s in seeds}
    first_done = threading.Event()  # the first run builds the processed-data cache alone

    jobs: list[tuple] = [("tt", s, None) for s in seeds] + [("sc", s, v) for v in variants for s in seeds]

    def save() -> None:
        a.summary.write_text(json.dumps(summary, indent=1))

    def do(job: tuple) -> None:
        kind, s, v = job
        base = [SPARCODE, "train", "--dataset", "movielens-100k", "--mirror", a.mirror, "--out", str(a.runs)]
        if kind == "tt":
            if s != seeds[0]:
                first_done.wait()
            cmd = (
                base
                + ["--model", "two-tower", "--set", "train.max_steps=1000", "--set", f"train.seed={s}"]
                + COMMON
            )
            folder = run_cmd(cmd, logs / f"two-tower-s{s}.log", a.runs)
            with lock:
                summary["two_tower"][str(s)] = str(folder)
                save()
            tt_done[s].set()
            first_done.set()
        else:
            tt_done[s].wait()
            tt = summary["two_tower"][str(s)]
            sets = ["train.max_steps=400"] + VARIANTS[v]
            cmd = base + ["--model", "sparcode", "--init-from", tt, "--set", f"train.seed={s}"] + COMMON
            for kv in sets:
                cmd += ["--set", kv]
            folder = run_cmd(cmd, logs / f"sparcode-{v}-s{s}.log", a.runs)
            with lock:
                summary["sparcode"].setdefault(v, {})[str(s)] = str(folder)
                save()

    queue = list(jobs)

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                job = queue.pop(0)
            try:
                do(job)
                print("done", job, time.strftime("%H:%M:%S"), flush=True)
            except Exception as e:  # keep going
                print("ERROR", job, e, flush=True)
                if job[0] == "tt":
                    tt_done[job[1]].set()
                    first_done.set()

    ts = [threading.Thread(target=worker) for _ in range(a.jobs)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


if __name__ == "__main__":
    main()
