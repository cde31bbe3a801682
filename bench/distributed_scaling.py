"""Data-parallel scaling on this machine: 1 process x 2 threads against 2 processes x 1 thread (issue #13).

    .venv/bin/python bench/distributed_scaling.py --mirror ../shared/data      # ~10 min, run it alone

On Gowalla, with `make reproduce-full`'s Gowalla recipe: training samples/s of the two-tower and of SparCode
(warm-started from that two-tower), and the build time of SparCode's index over every code, each through the
CLI exactly as a user runs it (`sparcode train [--nproc 2]`, `torchrun ... -m sparcode_cli index`). Writes
bench/distributed.md and .json. The runs are short (a step budget), so the rates are steady-state training
rates, not results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def recipe(dataset: str, model: str) -> list[str]:
    from sparcode_cli.reproduce.matrix import expand

    for t in expand("reproduce-full", datasets=[dataset]).trains:
        main_run = (
            t.seed == 0 and not t.variant and t.encoder in (None, "dnn") and t.interaction in (None, "mlp")
        )
        if t.model == model and main_run:
            return list(t.overrides)
    raise SystemExit(f"reproduce-full has no seed-0 dnn {model} run on {dataset}")


def sparcode(*args: str, nproc: int = 1, env: dict[str, str]) -> float:
    """Run the CLI (under torchrun for nproc > 1); wall seconds."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        cmd += ["-m", "sparcode_cli", *args]
    else:
        cmd = [sys.executable, "-m", "sparcode_cli", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="gowalla")
    ap.add_argument("--mirror", default=None, help="download mirror (a folder), e.g. ../shared/data")
    ap.add_argument("--home", type=Path, default=None, help="SPARCODE_HOME (default: the environment's)")
    ap.add_argument("--steps", type=int, default=300, help="two-tower steps; SparCode takes half")
    ap.add_argument("--work", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "distributed")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="sparcode-ddp-"))
    env = dict(os.environ)
    if args.home is not None:
        env["SPARCODE_HOME"] = str(args.home)
    base = ["--dataset", args.dataset, "--no-progress"] + (["--mirror", args.mirror] if args.mirror else [])
    layouts = {"1 process x 2 threads": (1, 2), "2 processes x 1 thread": (2, 1)}
    rows: list[dict] = []
    tt_run: Path | None = None
    for model, steps in (("two-tower", args.steps), ("sparcode", max(args.steps // 2, 1))):
        for label, (nproc, threads) in layouts.items():
            out = work / f"{model}-{nproc}x{threads}"
            sets = [*recipe(args.dataset, model), f"train.threads={threads}", f"train.max_steps={steps}"]
            cli = ["train", *base, "--model", model, "--out", str(out)]
            cli += [a for s in sets for a in ("--set", s)]
            if model == "sparcode":
                assert tt_run is not None
                cli += ["--init-from", str(tt_run)]
            env_run = {**env, "OMP_NUM_THREADS": str(threads)}
            wall = sparcode(*cli, nproc=nproc, env=env_run)
            (run,) = [p for p in out.iterdir() if p.is_dir()]
            res = json.loads((run / "results.json").read_text())
            rows.append(
                {
                    "what": f"train {model}",
                    "layout": label,
                    "steps": res["steps"],
                    "samples_per_s": res["samples_per_s"],
                    "train_time_s": res["train_time_s"],
                    "wall_s": round(wall, 1),
                }
            )
            print(rows[-1], flush=True)
            if model == "two-tower" and nproc == 1:
                tt_run = run
    sc_run = next(p for p in (work / "sparcode-1x2").iterdir() if p.is_dir())
    for label, (nproc, threads) in layouts.items():
        out = work / f"index-{nproc}x{threads}"
        cli = [
            "index",
            str(sc_run),
            "--out",
            str(out),
            "--codes",
            "all",
            "--threads",
            str(threads),
            "--device",
            "cpu",
        ]
        wall = sparcode(*cli, "--no-progress", nproc=nproc, env={**env, "OMP_NUM_THREADS": str(threads)})
        m = json.loads((out / "manifest.json").read_text())
        rows.append(
            {
                "what": f"index build, {m['n_codes_built']:,} codes x {m['n_items']:,} items",
                "layout": label,
                "build_s": round(m["build_s"], 2),
                "pairs_per_s": m["pairs_per_s"],
                "wall_s": round(wall, 1),
            }
        )
        print(rows[-1], flush=True)

    import torch

    lines = [
        f"# Data-parallel scaling on {args.dataset} (bench/distributed_scaling.py)",
        "",
        f"Machine: {os.cpu_count()} cores; torch {torch.__version__}, gloo backend. Same total threads in both "
        "layouts. Training: the `reproduce-full` Gowalla recipe, a step budget "
        f"({args.steps} two-tower steps, {max(args.steps // 2, 1)} SparCode steps warm-started from the "
        "1-process two-tower); samples/s counts training steps only (validation excluded).",
        "",
        "| what | layout | samples/s | build s | pairs/s | ratio to 1 process | wall s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rate = r.get("samples_per_s") or r.get("pairs_per_s")
        ref = next(x for x in rows if x["what"] == r["what"] and x["layout"].startswith("1 process"))
        ref_rate = ref.get("samples_per_s") or ref.get("pairs_per_s")
        lines.append(
            f"| {r['what']} | {r['layout']} | {r.get('samples_per_s', '') or ''} | {r.get('build_s', '')} | "
            + (f"{r['pairs_per_s']:,.0f}" if r.get("pairs_per_s") else "")
            + f" | {rate / ref_rate:.2f} | {r['wall_s']} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
