"""Multi-probe serving of trained SparCode runs: accuracy and cost at each `probes` P, beside Faiss flat.

`model.probes` P makes each user token read the rows of its P nearest codes (a beam over the codebooks,
`ResidualQuantizer.nearest`; P = 1 is the code trained on); the index is the same. For every SparCode run
given, this script builds its index once (`sparcode index`) and the Faiss flat index of the two-tower run it
was warm-started from, then for each P serves the index with `sparcode eval --index DIR --probes P`
(`evaluation.evaluate_index`, full ranking, query items masked, overlap with exact scoring checked) on the
validation and test splits. Per P it reports Recall@20 / @50, the index's batch QPS at 1 thread and its ratio
to Faiss flat's (measured in the same process, over the same users), the query encoding rate (the beam is part
of encoding: users/s with their codes), the two together (end to end, one thread), the rows and index
entries a test user reads, and the candidate recall (the share of a test user's targets with a positive
score, as in waterfall.py). `--density-factors` also serves sparser (or denser) indexes of the same model,
each row's cut shifted as `sparcode index --bias` and the reproduce sparsity sweep shift it, at every P.

    SPARCODE_HOME=<home> OMP_NUM_THREADS=1 .venv/bin/python experiments/scripts/multi_probe_probe.py \
        <sparcode run folder> [...] --probes 1,2,4,8 --density-factors 1,0.5,0.25 --json out.json --md out.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from waterfall import candidate_recall  # experiments/scripts/waterfall.py: the same definition as its steps

from sparcode_cli.evaluation import evaluate_index, load_artifact
from sparcode_cli.indexing import build_index, encode_users, set_probes
from sparcode_cli.paths import processed_root
from sparcode_cli.reproduce import jobs
from sparcode_cli.reproduce.jobs import _bias_for_density

KS = (20, 50)
EVAL = dict(threads=1, latency_queries=100, write=False, progress=False)


def read_rows(art: Any, ds: Any) -> tuple[float, float]:
    """(distinct code rows, index entries) a test user reads, means over test users."""
    es = ds.split("test")
    enc = encode_users(art.model, ds, es.query, es.users)
    index = art.index
    row_nnz = np.diff(index.matrix.indptr)
    rows, entries = [], []
    for codes in enc:
        uniq = np.unique(codes)
        pos = np.searchsorted(index.code_ids, uniq)
        built = (pos < len(index.code_ids)) & (
            index.code_ids[np.minimum(pos, len(index.code_ids) - 1)] == uniq
        )
        rows.append(len(uniq))
        entries.append(int(row_nnz[pos[built]].sum()))
    return float(np.mean(rows)), float(np.mean(entries))


def one_run(run: Path, probes: list[int], factors: list[float], work: Path) -> list[dict[str, Any]]:
    meta = json.loads((run / "meta.json").read_text())
    cfg = tomllib.loads((run / "config.toml").read_text())
    encoder = str(cfg["model"]["query_encoder"])
    two_tower = Path(meta["init_from"])
    ds = jobs.load(processed_root() / meta["data_hash"], 0, 0)
    tt_dir = work / f"{run.name}-flat"
    build_index(two_tower, tt_dir, ds=ds, faiss_kind="flat", progress=False)
    flat = {split: evaluate_index(tt_dir, ds, split, KS, **EVAL) for split in ("valid", "test")}
    out = []
    for factor, p in [(f, p) for f in factors for p in probes]:
        sp_dir = work / f"{run.name}-index-{factor:g}"
        if p == probes[0]:  # one index per density: the bias shift of the reproduce sparsity sweep
            bias = None if factor == 1.0 else _bias_for_density(run, ds, factor)[0]
            build_index(run, sp_dir, ds=ds, bias=bias, progress=False)
        res = {split: evaluate_index(sp_dir, ds, split, KS, probes=p, **EVAL) for split in ("valid", "test")}
        for split in res.values():
            if split["overlap@50"] != 1.0:
                raise SystemExit(
                    f"{run.name} P = {p}: the index differs from exact scoring ({split['overlap@50']})"
                )
        art = load_artifact(sp_dir)
        set_probes(art.model, p)
        rows, entries = read_rows(art, ds)
        cand, size = candidate_recall(art.model, ds)
        t = res["test"]
        rec = {
            "run": run.name,
            "two_tower": two_tower.name,
            "dataset": str(meta["dataset"]),
            "encoder": encoder,
            "seed": int(meta["seed"]),
            "probes": p,
            "density_factor": factor,
            "valid_r20": res["valid"]["recall@20"],
            "valid_r50": res["valid"]["recall@50"],
            "test_r20": t["recall@20"],
            "test_r50": t["recall@50"],
            "tt_valid_r20": flat["valid"]["recall@20"],
            "tt_valid_r50": flat["valid"]["recall@50"],
            "tt_test_r20": flat["test"]["recall@20"],
            "tt_test_r50": flat["test"]["recall@50"],
            "qps_1t": t["qps_batch_1t"],
            "flat_qps_1t": flat["test"]["qps_batch_1t"],
            "encode_qps": t["encode_qps"],
            "flat_encode_qps": flat["test"]["encode_qps"],
            "rows_read": rows,
            "entries_read": entries,
            "candidate_recall": cand,
            "set": size,
            "density": t["density"],
        }
        out.append(rec)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}), flush=True)
    return out


def both(retrieve_qps: float, encode_qps: float) -> float:
    """Users per second through encoding (the beam included) and retrieval, one after the other."""
    return 1.0 / (1.0 / retrieve_qps + 1.0 / encode_qps)


def table(recs: list[dict[str, Any]]) -> list[str]:
    """Mean over seeds per (dataset, encoder, density, P), then each (dataset, encoder)'s Faiss flat row."""
    by: dict[tuple[str, str, float, int], list[dict[str, Any]]] = defaultdict(list)
    for r in recs:
        by[(r["dataset"], r["encoder"], -r["density_factor"], r["probes"])].append(r)
    lines = [
        "| dataset | encoder | density | P | seeds | rows / user | entries / user | cand. recall | valid R@20 | valid R@50 | test R@20 "
        "| test R@50 | test R@50 − two-tower (per seed) | QPS 1 thread | × Faiss flat | encode users/s "
        "| end to end users/s | × flat end to end |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]

    def m(rs: list[dict[str, Any]], k: str) -> float:
        return statistics.mean(r[k] for r in rs)

    for (data, enc, _, p), rs in sorted(by.items()):
        rs = sorted(rs, key=lambda r: r["seed"])
        diffs = [r["test_r50"] - r["tt_test_r50"] for r in rs]
        ratio = statistics.mean(r["qps_1t"] / r["flat_qps_1t"] for r in rs)
        e2e = statistics.mean(both(r["qps_1t"], r["encode_qps"]) for r in rs)
        e2e_ratio = statistics.mean(
            both(r["qps_1t"], r["encode_qps"]) / both(r["flat_qps_1t"], r["flat_encode_qps"]) for r in rs
        )
        lines.append(
            f"| {data} | {enc} | {m(rs, 'density'):.4f} | {p} | {len(rs)} | {m(rs, 'rows_read'):.1f} | {m(rs, 'entries_read'):,.0f} "
            f"| {m(rs, 'candidate_recall'):.3f} | {m(rs, 'valid_r20'):.4f} | {m(rs, 'valid_r50'):.4f} "
            f"| {m(rs, 'test_r20'):.4f} | {m(rs, 'test_r50'):.4f} "
            f"| {statistics.mean(diffs):+.4f} ({', '.join(f'{d:+.4f}' for d in diffs)}) "
            f"| {m(rs, 'qps_1t'):,.0f} | {ratio:.1f}× | {m(rs, 'encode_qps'):,.0f} | {e2e:,.0f} | {e2e_ratio:.1f}× |"
        )
    first = (recs[0]["probes"], recs[0]["density_factor"])
    for data, enc in sorted({(r["dataset"], r["encoder"]) for r in recs}):
        rs = [
            r
            for r in recs
            if (r["dataset"], r["encoder"]) == (data, enc) and (r["probes"], r["density_factor"]) == first
        ]
        lines.append(
            f"| {data} | {enc}: two-tower, Faiss flat | – | – | {len(rs)} | – | – | – | {m(rs, 'tt_valid_r20'):.4f} "
            f"| {m(rs, 'tt_valid_r50'):.4f} | {m(rs, 'tt_test_r20'):.4f} | {m(rs, 'tt_test_r50'):.4f} | – "
            f"| {m(rs, 'flat_qps_1t'):,.0f} | 1.0× | {m(rs, 'flat_encode_qps'):,.0f} "
            f"| {statistics.mean(both(r['flat_qps_1t'], r['flat_encode_qps']) for r in rs):,.0f} | 1.0× |"
        )
    return lines


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="trained SparCode run folders")
    ap.add_argument("--probes", default="1,2,4,8", help="comma-separated P values")
    ap.add_argument(
        "--density-factors",
        default="1",
        help="comma-separated: also serve indexes `factor` x as dense as trained (sparcode index --bias)",
    )
    ap.add_argument("--json", type=Path, help="write every row as JSON")
    ap.add_argument("--md", type=Path, help="write the mean table as Markdown")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    probes = [int(p) for p in a.probes.split(",")]
    factors = [float(f) for f in a.density_factors.split(",")]
    recs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="multi-probe-") as work:
        for run in a.runs:
            recs += one_run(run, probes, factors, Path(work))
    if a.json:
        a.json.write_text(json.dumps(recs, indent=1))
    lines = table(recs)
    print("\n".join(lines))
    if a.md:
        a.md.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
