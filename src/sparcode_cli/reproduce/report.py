"""Write `<results>/<dataset>.md` (+ `<dataset>.json` and the PNGs) from the evaluated cells.

Sections: the main table (every model x encoder, mean ± std over seeds), the paired bootstrap over users
(SparCode against two-tower with the same encoder, all-to-all against SparCode), the sparsity sweep, the
codebook sweep, the operating points, what agrees with the paper's claims and what does not, and the
published numbers to set beside ours. Everything is computed from the cached cell JSONs and the runs'
`results_per_user.npz`, so the report can be rebuilt without training or evaluating anything.
"""

from __future__ import annotations

import contextlib
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from sparcode_cli.atomic import write_json, write_text
from sparcode_cli.bootstrap import align_users, paired_bootstrap
from sparcode_cli.reproduce import plots
from sparcode_cli.reproduce.jobs import as_listed, cell_path, read_cell
from sparcode_cli.reproduce.matrix import dataset_label
from sparcode_cli.reproduce.reference import references_for

MODEL_ORDER = {"popularity": 0, "two-tower": 1, "sparcode": 2, "all-to-all": 3}
RETRIEVER_ORDER = {"exact": 0, "flat": 1, "ivf": 2, "hnsw": 3, "sparse": 4}
RETRIEVER_LABEL = {
    "exact": "exact (brute force)",
    "flat": "Faiss flat",
    "ivf": "Faiss IVF",
    "hnsw": "Faiss HNSW",
    "sparse": "sparse code index",
}
QUALITY = ("recall@20", "recall@50", "ndcg@20", "ndcg@50")
MB = 2**20


# ------------------------------------------------------------------------------------------------ helpers
def cached_cells(plan: Any, job_of: dict[Any, Any], split: str) -> list[dict[str, Any]]:
    """The cells already evaluated (for --report-only)."""
    out = []
    for spec in plan.evals:
        job = job_of.get(spec.train)
        if job is None:
            continue
        cell = read_cell(cell_path(job.run_dir, spec, split))
        if cell is not None:
            out.append(as_listed(cell, spec))
    return out


def _kernels(k: dict[str, str] | None) -> str:
    """The CPU kernel family of the run (cpu_kernels.kernel_family): ATen's capability, MKL's path, AVX-512."""
    if not k:
        return "not recorded"
    return f"ATen {k.get('aten', '?')}, MKL_CBWR {k.get('MKL_CBWR', '?')}, host AVX-512 {k.get('host_avx512', '?')}"


def _num(v: Any) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def mean_std(values: list[float | None]) -> tuple[float | None, float | None, int]:
    v = [x for x in values if x is not None]
    if not v:
        return None, None, 0
    a = np.asarray(v, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else None), len(a)


def fmt_ms(m: float | None, s: float | None, fmt: str = ".4f") -> str:
    if m is None:
        return "–"
    return format(m, fmt) + (f" ± {format(s, fmt)}" if s is not None else "")


def _f(v: float | None, fmt: str = ".4f") -> str:
    return "–" if v is None else format(v, fmt)


def table(header: list[str], rows: list[list[str]], align: str = "") -> str:
    al = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in al]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _train_seconds(cell: dict[str, Any]) -> float | None:
    """The run's training time, plus its warm-start run's (that time counts for the warm-started model)."""
    t = _num(cell.get("train", {}).get("train_time_s"))
    init = (cell.get("train", {}).get("meta") or {}).get("init_from")
    if t is not None and init:
        p = Path(init) / "results.json"
        with contextlib.suppress(OSError, ValueError):
            t += float(json.loads(p.read_text(encoding="utf-8")).get("train_time_s", 0.0))
    return t


# ------------------------------------------------------------------------------------------------ main table
def row_key(c: dict[str, Any]) -> tuple[Any, ...]:
    return (
        MODEL_ORDER.get(c["model"], 9),
        c.get("encoder") or "",
        c.get("interaction") or "",
        RETRIEVER_ORDER.get(c["retriever"], 9),
        c["model"],
        c["retriever"],
    )


def main_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, encoder, interaction, retriever): quality and cost as mean, std over seeds."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault(row_key(c), []).append(c)
    rows = []
    for key in sorted(groups):
        cs = sorted(groups[key], key=lambda c: c["seed"])
        c0 = cs[0]
        m = [c["metrics"] for c in cs]
        row: dict[str, Any] = {
            "model": c0["model"],
            "label": c0["model"] if not c0.get("interaction") else f"{c0['model']} ({c0['interaction']})",
            "encoder": c0.get("encoder") or "–",
            "interaction": c0.get("interaction"),
            "retriever": c0["retriever"],
            "seeds": [c["seed"] for c in cs],
            "n_users": m[0].get("n_users"),
            "threads": m[0].get("threads"),
            "timing_includes_encoding": bool(m[0].get("timing_includes_encoding")),
            "probes": m[0].get("probes"),  # a sparse index's code ids per user token
            "run_ids": [c["run_id"] for c in cs],
        }
        for k in QUALITY + ("overlap@50",):
            row[k] = mean_std([_num(x.get(k)) for x in m])
        row["qps_1t"] = mean_std([_num(x.get("qps_batch_1t")) for x in m])
        row["qps_nt"] = mean_std([_num(x.get("qps_batch")) for x in m])
        row["p50_ms_1t"] = mean_std([_num(x.get("latency_p50_ms_1t")) for x in m])
        idx = [_num(x.get("index_bytes")) for x in m]
        row["index_mb"] = mean_std([None if v is None else v / MB for v in idx])
        row["density"] = mean_std([_num(x.get("density")) for x in m])
        row["train_s"] = mean_std([_train_seconds(c) for c in cs])
        rows.append(row)
    return rows


def render_main(rows: list[dict[str, Any]]) -> str:
    threads = next((r["threads"] for r in rows if r.get("threads")), 1)
    many = threads != 1
    header = [
        "model",
        "encoder",
        "retrieval",
        "seeds",
        "Recall@20",
        "Recall@50",
        "NDCG@20",
        "NDCG@50",
        "QPS 1 thr",
        *([f"QPS {threads} thr"] if many else []),
        "index MB",
        "density",
        "train s",
    ]
    out = []
    for r in rows:
        ret = (
            RETRIEVER_LABEL.get(r["retriever"], r["retriever"])
            + (f", {r['probes']} probes" if (r.get("probes") or 1) > 1 else "")
            + (" †" if r["timing_includes_encoding"] else "")
        )
        out.append(
            [
                r["label"],
                r["encoder"],
                ret,
                str(len(r["seeds"])),
                *(fmt_ms(*r[k][:2]) for k in QUALITY),
                fmt_ms(*r["qps_1t"][:2], ",.0f"),
                *([fmt_ms(*r["qps_nt"][:2], ",.0f")] if many else []),
                fmt_ms(*r["index_mb"][:2], ".2f"),
                fmt_ms(*r["density"][:2], ".4f"),
                fmt_ms(*r["train_s"][:2], ".0f"),
            ]
        )
    return table(header, out, "lll" + "r" * (len(header) - 3))


# ------------------------------------------------------------------------------------------------ bootstrap
def _per_user(run_dir: str, split: str, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    p = Path(run_dir) / "results_per_user.npz"
    try:
        with np.load(p, allow_pickle=False) as z:
            return np.asarray(z[f"{split}.users"]), np.asarray(z[f"{split}.{metric}"], dtype=np.float64)
    except (OSError, KeyError, ValueError):
        return None


def _stack(
    cells: list[dict[str, Any]], seeds: list[int], split: str, metric: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """(users, (S, U) values) of the runs of `seeds`, on the users every run holds."""
    by_seed = {c["seed"]: c for c in cells}
    got = [_per_user(by_seed[s]["run_dir"], split, metric) for s in seeds]
    if any(g is None for g in got):
        return None
    users = got[0][0]
    for u, _ in got[1:]:
        users = np.intersect1d(users, u)
    vals = [v[np.searchsorted(u, users)] if np.all(np.diff(u) > 0) else v[np.isin(u, users)] for u, v in got]
    return users, np.stack(vals)


def bootstrap_rows(cells: list[dict[str, Any]], split: str, n_boot: int, seed: int) -> list[dict[str, Any]]:
    """SparCode vs two-tower (same encoder) and all-to-all vs SparCode (same encoder and interaction)."""
    exact = [c for c in cells if c["retriever"] in ("sparse", "flat", "exact")]
    pick: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for c in exact:
        pick.setdefault((c["model"], c.get("encoder") or "", c.get("interaction") or ""), []).append(c)
    pairs = []
    for (model, enc, inter), cs in sorted(pick.items()):
        if model == "sparcode":
            b = pick.get(("two-tower", enc, ""))
            if b:
                pairs.append((f"sparcode ({inter})", "two-tower", enc, cs, b))
        if model == "all-to-all":
            b = pick.get(("sparcode", enc, inter))
            if b:
                pairs.append((f"all-to-all ({inter})", f"sparcode ({inter})", enc, cs, b))
    out = []
    pairs.sort(key=lambda p: (p[1] != "two-tower", p[2], p[0]))  # sparcode vs two-tower first
    for a_name, b_name, enc, a_cells, b_cells in pairs:
        seeds = sorted({c["seed"] for c in a_cells} & {c["seed"] for c in b_cells})
        row: dict[str, Any] = {"a": a_name, "b": b_name, "encoder": enc, "seeds": seeds}
        for metric in ("recall@20", "recall@50"):
            sa, sb = _stack(a_cells, seeds, split, metric), _stack(b_cells, seeds, split, metric)
            if not seeds or sa is None or sb is None:
                row[metric] = None
                continue
            users, va, vb = align_users(sa[0], sa[1], sb[0], sb[1])
            res = paired_bootstrap(va, vb, n_boot=n_boot, seed=seed)
            row[metric] = res.to_dict()
        out.append(row)
    return out


def render_bootstrap(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        cells = []
        for metric in ("recall@20", "recall@50"):
            b = r.get(metric)
            cells.append("–" if not b else f"{b['diff']:+.4f} [{b['low']:+.4f}, {b['high']:+.4f}]")
        b20 = r.get("recall@20")
        verdict = "–"
        if b20:
            verdict = {
                "a > b": f"{r['a']} better",
                "a < b": f"{r['b']} better",
            }.get(b20["verdict"], "no detectable difference")
        n = b20["n_users"] if b20 else "–"
        out.append([f"{r['a']} − {r['b']}", r["encoder"], str(len(r["seeds"])), str(n), *cells, verdict])
    header = [
        "comparison",
        "encoder",
        "seeds",
        "users",
        "ΔRecall@20 [95% CI]",
        "ΔRecall@50 [95% CI]",
        "at Recall@20",
    ]
    return table(header, out, "lllrrrl")


# ------------------------------------------------------------------------------------------------ sweeps
def bias_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for c in cells:
        m, man = c["metrics"], c.get("manifest", {})
        rows.append(
            {
                "density_factor": c.get("density_factor", c["options"].get("density_factor", 1.0)),
                "trained": float(c["options"].get("density_factor", 1.0)) == 1.0,
                "bias": _num(man.get("bias")),
                "bias_trained": _num(man.get("bias_trained")),
                "density": _num(m.get("density")) or 0.0,
                "nnz": man.get("nnz"),
                "mean_row_nnz": _num(man.get("mean_row_nnz")),
                "index_mb": (_num(m.get("index_bytes")) or 0.0) / MB,
                "recall@20": _num(m.get("recall@20")),
                "recall@50": _num(m.get("recall@50")),
                "qps_1t": _num(m.get("qps_batch_1t")) or 0.0,
                "qps_nt": _num(m.get("qps_batch")),
                "overlap@50": _num(m.get("overlap@50")),
                "mean_list_len": _num(m.get("mean_list_len")),
                "on_the_fly": m.get("users_on_the_fly"),
                "build_s": _num(man.get("build_s")),
            }
        )
    return sorted(rows, key=lambda r: -r["density"])


def render_bias(rows: list[dict[str, Any]]) -> str:
    header = [
        "density ×",
        "bias",
        "density",
        "nnz",
        "index MB",
        "Recall@50",
        "QPS 1 thr",
        "mean list",
        "overlap@50",
        "build s",
    ]
    out = [
        [
            f"{r['density_factor']:g}" + (" (trained)" if r["trained"] else ""),
            _f(r["bias"], ".3f"),
            _f(r["density"], ".4f"),
            f"{r['nnz']:,}" if r["nnz"] is not None else "–",
            _f(r["index_mb"], ".2f"),
            _f(r["recall@50"]),
            _f(r["qps_1t"], ",.0f"),
            _f(r["mean_list_len"], ".1f"),
            _f(r["overlap@50"]),
            _f(r["build_s"], ".2f"),
        ]
        for r in rows
    ]
    return table(header, out)


def codebook_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for c in cells:
        m, man = c["metrics"], c.get("manifest", {})
        var = c.get("variant") or {}
        stats = c.get("train", {}).get("last_epoch_stats") or {}
        rows.append(
            {
                "n_codewords": int(var.get("n_codewords", 0)),
                "m": len(stats["codes_in_use"]) if stats.get("codes_in_use") else None,
                "k_u": int(var.get("k_u", 0)),
                "codes_built": int(man.get("n_codes_built") or 0),
                "universe": int(man.get("n_codes_universe") or 0),
                "codewords_in_use": stats.get("codes_in_use"),
                "recall@50": _num(m.get("recall@50")),
                "recall@20": _num(m.get("recall@20")),
                "density": _num(m.get("density")),
                "index_mb": (_num(m.get("index_bytes")) or 0.0) / MB,
                "build_s": _num(man.get("build_s")) or 0.0,
                "qps_1t": _num(m.get("qps_batch_1t")),
                "train_s": _train_seconds(c),
            }
        )
    return sorted(rows, key=lambda r: (r["n_codewords"], r["k_u"]))


def render_codebook(rows: list[dict[str, Any]]) -> str:
    header = [
        "N",
        "K_u",
        "codes in use / N^M",
        "codewords in use per codebook",
        "Recall@50",
        "density",
        "index MB",
        "build s",
        "QPS 1 thr",
        "train s",
    ]
    out = []
    for r in rows:
        cw = r["codewords_in_use"]
        cw_s = " / ".join(f"{v}" for v in cw) + f" of {r['n_codewords']}" if cw else "–"
        out.append(
            [
                str(r["n_codewords"]),
                str(r["k_u"]),
                f"{r['codes_built']:,} / {r['universe']:,}",
                cw_s,
                _f(r["recall@50"]),
                _f(r["density"], ".4f"),
                _f(r["index_mb"], ".2f"),
                _f(r["build_s"], ".2f"),
                _f(r["qps_1t"], ",.0f"),
                _f(r["train_s"], ".0f"),
            ]
        )
    return table(header, out)


def hnsw_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for c in cells:
        m, man = c["metrics"], c.get("manifest", {})
        rows.append(
            {
                "ef_search": int(c["options"].get("ef_search", 0)),
                "recall@50": _num(m.get("recall@50")),
                "qps_1t": _num(m.get("qps_batch_1t")) or 0.0,
                "qps_nt": _num(m.get("qps_batch")),
                "p50_ms_1t": _num(m.get("latency_p50_ms_1t")),
                "overlap@50": _num(m.get("overlap@50")),
                "build_s": _num(man.get("build_s")),
                "index_mb": (_num(m.get("index_bytes")) or 0.0) / MB,
            }
        )
    return sorted(rows, key=lambda r: r["ef_search"])


def render_hnsw(rows: list[dict[str, Any]], flat: list[dict[str, Any]]) -> str:
    header = [
        "retriever",
        "Recall@50",
        "QPS 1 thr",
        "p50 ms 1 thr",
        "overlap@50 vs flat",
        "index MB",
        "build s",
    ]
    out = [
        [
            f"HNSW efSearch {r['ef_search']}",
            _f(r["recall@50"]),
            _f(r["qps_1t"], ",.0f"),
            _f(r["p50_ms_1t"], ".3f"),
            _f(r["overlap@50"]),
            _f(r["index_mb"], ".2f"),
            _f(r["build_s"], ".2f"),
        ]
        for r in rows
    ]
    out += [
        [
            "flat (exact)",
            _f(r["recall@50"]),
            _f(r["qps_1t"], ",.0f"),
            _f(r["p50_ms_1t"], ".3f"),
            "1.0000",
            _f(r["index_mb"], ".2f"),
            _f(r["build_s"], ".2f"),
        ]
        for r in flat
    ]
    return table(header, out)


def _flat_points(cells: list[dict[str, Any]], seed: int, encoder: str | None) -> list[dict[str, Any]]:
    out = []
    for c in cells:
        if (
            c["retriever"] == "flat"
            and c["seed"] == seed
            and (encoder is None or c.get("encoder") == encoder)
        ):
            m, man = c["metrics"], c.get("manifest", {})
            out.append(
                {
                    "recall@50": _num(m.get("recall@50")),
                    "qps_1t": _num(m.get("qps_batch_1t")) or 0.0,
                    "p50_ms_1t": _num(m.get("latency_p50_ms_1t")),
                    "index_mb": (_num(m.get("index_bytes")) or 0.0) / MB,
                    "build_s": _num(man.get("build_s")),
                }
            )
    return out


# ------------------------------------------------------------------------------------------------ claims
def claims(
    rows: list[dict[str, Any]], boot: list[dict[str, Any]], bias: list[dict[str, Any]]
) -> list[tuple[str, str, str]]:
    """(claim, verdict, evidence) for the paper's claims that this matrix can test."""
    out: list[tuple[str, str, str]] = []
    for b in boot:
        r20 = b.get("recall@20")
        if not r20:
            continue
        if b["b"] == "two-tower":
            claim = f"SparCode beats two-tower with the same encoder ({b['a']}, {b['encoder']})"
            paper = "paper: +0.65 to +1.23 points Recall@50 on ML-10M"
            if r20["verdict"] == "a > b":
                v = "agrees"
            elif r20["verdict"] == "a < b":
                v = "does not agree (two-tower is better here)"
            else:
                v = "not shown (difference within noise)"
        else:
            claim = f"all-to-all is the ceiling above SparCode ({b['a']} over {b['b']}, {b['encoder']})"
            paper = "paper: all-to-all SASRec 31.95% vs SparCode SASRec 30.14% Recall@50"
            if r20["verdict"] == "a > b":
                v = "agrees"
            elif r20["verdict"] == "a < b":
                v = "does not agree (SparCode is better here)"
            else:
                v = "not shown (difference within noise)"
        ev = f"ΔRecall@20 {r20['diff']:+.4f} [{r20['low']:+.4f}, {r20['high']:+.4f}] over {r20['n_users']} users; {paper}"
        out.append((claim, v, ev))
    sparse = [r for r in rows if r["retriever"] == "sparse"]
    flat = [r for r in rows if r["retriever"] == "flat"]
    for r in sparse:
        ov = r["overlap@50"][0]
        if ov is not None:
            v = "agrees" if ov >= 0.999 else "does not agree"
            out.append(
                (
                    f"the index serves exactly what the model scores, no train/serve gap ({r['label']}, {r['encoder']})",
                    v,
                    f"overlap@50 between index retrieval and exact model scoring: {ov:.4f}",
                )
            )
    for r in sparse:  # against Faiss flat over the two-tower with the same encoder
        same = [x for x in flat if x["encoder"] == r["encoder"]]
        s = r["qps_1t"][0] or 0.0
        f = (same[0]["qps_1t"][0] or 0.0) if same else 0.0
        if s and f:
            v = "agrees" if s >= f else "does not agree"
            out.append(
                (
                    "sparse-index retrieval is at least as fast as exact Faiss flat search (DESIGN §7) "
                    f"({r['label']}, {r['encoder']})",
                    v,
                    f"batch QPS at 1 thread: sparse {s:,.0f} vs flat {f:,.0f} ({s / f:.2f}x)",
                )
            )
    if len(bias) >= 3:
        dens = [r for r in bias if r["recall@50"] is not None]
        dens.sort(key=lambda r: r["density"])
        rec = [r["recall@50"] for r in dens]
        qps = [r["qps_1t"] for r in dens]
        mono = all(b >= a - 0.005 for a, b in zip(rec, rec[1:], strict=False))
        faster = qps[0] > qps[-1]
        v = "agrees" if (mono and faster) else "partly" if (mono or faster) else "does not agree"
        out.append(
            (
                "sparsity trades accuracy for speed and size (a higher cut: smaller, faster, lower recall)",
                v,
                f"density {dens[0]['density']:.4f} → {dens[-1]['density']:.4f}: Recall@50 {rec[0]:.4f} → {rec[-1]:.4f}, "
                f"QPS {qps[0]:,.0f} → {qps[-1]:,.0f}, index {dens[0]['index_mb']:.2f} → {dens[-1]['index_mb']:.2f} MB",
            )
        )
    return out


# ------------------------------------------------------------------------------------------------ the report
def write_report(
    dataset: str, cells: list[dict[str, Any]], plan: Any, info: dict[str, Any], results: Path
) -> Path:
    """Write `<results>/<dataset>.md`, `<dataset>.json` and the PNGs; returns the .md path."""
    results.mkdir(parents=True, exist_ok=True)
    split = str(plan.settings["split"])
    label = dataset_label(dataset)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)
    sampled = int(plan.spec.get("eval_users", {}).get(dataset, 0))
    seeds = list(plan.spec.get("seeds", []))
    first_seed = seeds[0] if seeds else 0
    enc0 = (plan.spec.get("encoders") or ["dnn"])[0]

    main = [c for c in cells if c["table"] == "main"]
    rows = main_rows(main)
    boot = bootstrap_rows(
        main, split, int(plan.settings["bootstrap_samples"]), int(plan.settings["bootstrap_seed"])
    )
    b_rows = bias_rows([c for c in cells if c["table"] == "bias"])
    c_rows = codebook_rows([c for c in cells if c["table"] == "codebook"])
    h_rows = hnsw_rows([c for c in cells if c["table"] == "hnsw"])
    flat = _flat_points(main, first_seed, enc0)

    threads = int(plan.settings["eval_threads"])
    n_users = next((r["n_users"] for r in rows if r.get("n_users")), None)
    mach = info.get("machine", {})
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    L: list[str] = [f"# `{plan.matrix}` on {label}", ""]
    L.append(
        f"Generated {now} by `python -m sparcode_cli.reproduce --matrix {plan.matrix}` at commit "
        f"{info.get('git_commit') or 'unknown'} (code digest {info.get('code_digest')}); "
        f"{mach.get('cores', '?')} cores ({mach.get('cpu', '')}), torch {mach.get('torch', '?')}, "
        f"CPU kernels {_kernels(mach.get('cpu_kernels'))}. "
        f"Wall time of this invocation: **{info['wall_s'] / 60:.1f} min** ({info['trained_now']} runs trained now, "
        f"{info['reused']} reused from earlier invocations)."
    )
    L.append("")
    data = ", ".join(
        f"`{d['data_hash']}` (content digest `{d['content_digest']}`)"
        for d in info.get("data", {}).get(dataset, [])
    )
    L.append(
        f"Processed data: {data or 'unknown'}. Every run and cell here was made by the code of that digest from "
        "that data: a cached run or cell made by other code is never reused."
    )
    L.append("")
    steps = {**(info.get("max_steps") or {}), **(info.get("dataset_max_steps") or {}).get(dataset, {})}
    budgets = ", ".join(f"{k} {v}" for k, v in steps.items())
    recipe = (info.get("dataset_set") or {}).get(dataset, {})
    recipe_text = "".join(
        f"; {model} also runs with `{' '.join('--set ' + o for o in sets)}` here"
        for model, sets in recipe.items()
    )
    L.append(
        f"Protocol: split `{split}`, {n_users if n_users is not None else '?'} evaluated users"
        + (
            f" (a fixed seeded sample of {sampled} test users; sample seed {plan.settings['sample_seed']}; "
            "checkpoints are selected on all validation users, all-to-all's on the same sample of them)"
            if sampled
            else ""
        )
        + f"; full ranking over all items with every history item masked; seeds {seeds}; a fixed sample budget per "
        f"run (train.max_steps at the config's batch size, 512 unless set: {budgets}{recipe_text}; sparcode and all-to-all start from the same-seed two-tower run"
        f"{'' if plan.spec.get('warm_start', True) else ' — off here'}, and their train time includes that run's); "
        f"early stopping on validation Recall@20 keeps the best checkpoint. Training: {plan.settings['jobs']} "
        f"parallel runs x {plan.settings['train_threads']} torch thread(s). Evaluation: alone, QPS = batch queries "
        f"per second over all evaluated users, retrieval only, at 1 thread and at {threads}."
    )
    L.append("")

    L += ["## Main table", ""]
    if rows:
        L.append(render_main(rows))
        L += [
            "",
            "Mean ± std over seeds (popularity is deterministic: one run). † brute-force scoring: its QPS includes "
            "encoding the queries and scoring every item. QPS measured on a shared machine: compare within a table.",
        ]
    else:
        L.append("_No evaluated cells yet._")
    if sampled:
        all_rows = main_rows([c for c in cells if c["table"] == "main-all"])
        if all_rows:
            L += [
                "",
                "All test users (models cheap enough to score them all; all-to-all is on the sample only):",
                "",
            ]
            L.append(render_main(all_rows))
    L += ["", "## Paired bootstrap over users", ""]
    if boot:
        L.append(render_bootstrap(boot))
        L += [
            "",
            f"Per-user differences (each user's value averaged over the seeds both models ran), users resampled "
            f"with replacement {plan.settings['bootstrap_samples']} times (seed {plan.settings['bootstrap_seed']}); "
            "95% percentile interval of the mean difference. Per-user values come from each run's exact scoring "
            "(`results_per_user.npz`), which is what the sparse index and Faiss flat serve (overlap@50 = 1).",
        ]
    else:
        L.append("_Needs sparcode and two-tower cells._")

    if b_rows:
        png = plots.sparsity(
            b_rows, results / f"{safe}-sparsity.png", f"{label}: sparsity sweep (sparcode index --bias)"
        )
        L += ["", "## Sparsity sweep", ""]
        L.append(
            f"`sparcode index --bias b` on one trained model (seed {first_seed}, {enc0}); b is chosen so the "
            "index is `density ×` as dense as with the trained bias (from quantiles of g over the reached codes), "
            "and the density column is what the built index measured."
        )
        L += ["", render_bias(b_rows), "", f"![sparsity sweep]({png.name})"]
    if c_rows:
        ms = sorted({r["m"] for r in c_rows if r.get("m")})
        m_txt = f" (M = {ms[0]})" if len(ms) == 1 else ""
        png = plots.codebook(c_rows, results / f"{safe}-codebook.png", f"{label}: codebook sweep{m_txt}")
        L += ["", "## Codebook sweep", ""]
        L.append(
            f"One run per (N, K_u), seed {first_seed}, {enc0} encoder, same budget and warm start. *Codes in use* = "
            "distinct code ids the training and validation users reach (= index rows built); *codewords in use* = "
            "per codebook, in the last training epoch."
        )
        L += ["", render_codebook(c_rows), "", f"![codebook sweep]({png.name})"]
    if h_rows or b_rows:
        png = plots.operating_points(
            b_rows, h_rows, flat, results / f"{safe}-operating-points.png", f"{label}: Recall@50 vs QPS"
        )
        L += ["", "## Operating points", ""]
        L.append(
            "Recall@50 against batch QPS at 1 thread: SparCode over the sparsity sweep (labels: density), Faiss "
            "HNSW over efSearch (labels; Faiss raises efSearch to K + the longest history of each batch so "
            "masking cannot under-fill a list, so low values coincide), and exact Faiss flat, all from the "
            f"seed-{first_seed} runs."
        )
        if h_rows:
            L += ["", render_hnsw(h_rows, flat)]
        L += ["", f"![operating points]({png.name})"]

    cl = claims(rows, boot, b_rows)
    if cl:
        L += ["", "## Against the paper's claims", ""]
        L.append(table(["claim", "here", "evidence"], [[a, f"**{b}**", c] for a, b, c in cl], "lll"))

    L += ["", "## Published numbers to set beside these", ""]
    for ref in references_for(label):
        L.append(f"**{ref['title']}** (not re-run here)")
        L.append("")
        L.append(
            table(
                ["model", "encoder", *ref["columns"]],
                [
                    [a, b or "–", *(f"{v:.2f}" if v > 1 else f"{v:.4f}" for v in vals)]
                    for a, b, *vals in ref["rows"]
                ],
            )
        )
        L += ["", f"Protocol differences: {ref['protocol']}", ""]

    notes = []
    if info.get("skipped"):
        notes += [f"- skipped: {s}" for s in info["skipped"]]
    if info.get("failures"):
        notes += [f"- failed: {s}" for s in info["failures"]]
    if notes:
        L += ["## Not in these tables", "", *notes, ""]

    md = results / f"{safe}.md"
    write_text(md, "\n".join(L).rstrip() + "\n")
    write_json(
        results / f"{safe}.json",
        {
            "dataset": label,
            "matrix": plan.matrix,
            "generated": now,
            "info": info,
            "main": rows,
            "main_all": main_rows([c for c in cells if c["table"] == "main-all"]) if sampled else [],
            "bootstrap": boot,
            "bias_sweep": b_rows,
            "codebook_sweep": c_rows,
            "hnsw_sweep": h_rows,
            "claims": [{"claim": a, "verdict": b, "evidence": c} for a, b, c in cl],
        },
    )
    return md
