"""Compact index scores (issue #14 item 3): each `sparcode index --scores` encoding of one SparCode run, measured.

    .venv/bin/python bench/compact_scores.py --run runs/sparcode-gowalla-... [--max-per-code M] [--codes auto]
        [--dataset NAME] [--mirror DIR] [--repeats 3] [--k 50] [--md bench/compact_scores.md]

For float32 (the default), float16 and uint8 (a scale per code row) it builds the index with the same options,
then on the test users (history masked, 1 thread): the index size (index.npz + index_codes.npz bytes, and in
memory), overlap@K of its lists against float32's lists (`overlap_at_k`), test Recall@K, and batch QPS (all
test users in one `retrieve` call, median of `--repeats` after a warm-up, `sparcode_cli.timing.median_time`).
Writes a markdown table to `--md`. Float32 stays the default unless a compact encoding reaches overlap >= 0.999.
Run it alone: QPS is timing-sensitive.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

ROOT = Path(__file__).resolve().parent.parent
ENCODINGS = ("float32", "float16", "uint8")
TARGET = 0.999


def measure(a: argparse.Namespace, work: Path) -> list[dict]:
    from sparcode_cli.evaluation import _resolve, index_retrieve, load_artifact
    from sparcode_cli.indexing import build_index, encode_users
    from sparcode_cli.metrics import metrics_from_topk
    from sparcode_cli.retrieval.sparse_index import overlap_at_k
    from sparcode_cli.timing import median_time

    ds, rows, ref = None, [], None
    for enc_name in ENCODINGS:
        out = work / enc_name
        m = build_index(
            a.run, out, ds=ds, dataset=a.dataset, mirror=a.mirror, max_per_code=a.max_per_code, codes=a.codes,
            scores=enc_name, threads=1, device="cpu", progress=False,
        )  # fmt: skip
        if ds is None:
            ds = _resolve(
                None, str(m["data_hash"]), str(m["dataset"]), dict(m.get("data_params") or {}),
                m.get("processed_dir"), a.dataset, a.mirror, False,
            )  # fmt: skip
            es = ds.split("test")
        art = load_artifact(out)
        enc = encode_users(art.model, ds, es.query, es.users)
        top = index_retrieve(art, enc, es.query, a.k)  # warm-up: compiles, fills the bound table
        t = median_time(lambda art=art, enc=enc, es=es: index_retrieve(art, enc, es.query, a.k), a.repeats)
        if ref is None:
            ref = top
        res = metrics_from_topk(top.items, es.targets, (a.k,), users=es.users, lengths=top.lengths)
        row = {
            "scores": enc_name,
            "index_bytes": int(m["index_bytes"]),
            "mem_bytes": int(m["index_mem_bytes"]),
            "nnz": int(m["nnz"]),
            "overlap": float(overlap_at_k(top, ref, a.k)),
            "recall": float(res.summary[f"recall@{a.k}"]),
            "qps": len(es.users) / t,
            "users": len(es.users),
            "dataset": str(m["dataset"]),
        }
        rows.append(row)
        print(
            f"{enc_name}: {row['index_bytes'] / 2**20:.2f} MiB, overlap@{a.k} {row['overlap']:.5f}, "
            f"R@{a.k} {row['recall']:.4f}, {row['qps']:,.0f} QPS",
            file=sys.stderr,
            flush=True,
        )
    return rows


def markdown(a: argparse.Namespace, rows: list[dict]) -> str:
    from sparcode_cli.provenance import git_commit

    base = rows[0]
    k = a.k
    lines = [
        "# Compact index scores",
        "",
        f"Generated {datetime.now(UTC).isoformat(timespec='seconds')} by `bench/compact_scores.py` at commit "
        f"{git_commit() or '?'}: run `{Path(a.run).name}` ({base['dataset']}), {base['users']:,} test users, "
        f"codes {a.codes or 'auto'}, max per code {a.max_per_code or '-'}, 1 thread, QPS the median of "
        f"{a.repeats} batch passes. Overlap@{k} is against float32's lists.",
        "",
        f"| scores | index size (MiB) | vs float32 | in memory (MiB) | overlap@{k} | R@{k} | batch QPS | vs float32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scores']} | {r['index_bytes'] / 2**20:,.2f} | {r['index_bytes'] / base['index_bytes']:.2f}x | "
            f"{r['mem_bytes'] / 2**20:,.2f} | {r['overlap']:.5f} | {r['recall']:.4f} | {r['qps']:,.0f} | "
            f"{r['qps'] / base['qps']:.2f}x |"
        )
    ok = [r["scores"] for r in rows[1:] if r["overlap"] >= TARGET]
    lines += [
        "",
        f"Compact encodings at overlap@{k} >= {TARGET} (the bar for a default other than float32): "
        f"{', '.join(ok) if ok else 'none'}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="A SparCode run folder written by `sparcode train`.")
    ap.add_argument("--max-per-code", type=int, default=None)
    ap.add_argument("--codes", default=None, choices=("auto", "reached", "all"))
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--mirror", default=os.environ.get("SPARCODE_MIRROR"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--work", default=None, help="Folder for the built indexes (default: a temporary one).")
    ap.add_argument("--md", default=str(ROOT / "bench" / "compact_scores.md"))
    a = ap.parse_args()
    if a.work:
        rows = measure(a, Path(a.work))
    else:
        with tempfile.TemporaryDirectory(prefix="compact_scores.") as tmp:
            rows = measure(a, Path(tmp))
    text = markdown(a, rows)
    Path(a.md).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
