"""The report's PNGs (matplotlib, Agg backend, no timestamps in the files): sparsity sweep, codebook sweep,
and the Recall@50-vs-QPS operating points of SparCode, Faiss HNSW and Faiss flat."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sparcode_cli.atomic import atomic_path  # noqa: E402

META = {"Software": None}  # no version string in the PNG: a re-run with equal numbers gives an equal file


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", metadata=META)
    plt.close(fig)
    return path


def sparsity(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """rows: density, index_mb, recall@50, qps_1t (one per bias point)."""
    rows = sorted(rows, key=lambda r: r["density"])
    x = [r["density"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, label in zip(
        axes,
        ("recall@50", "qps_1t", "index_mb"),
        ("Recall@50", "QPS (batch, 1 thread)", "index MB"),
        strict=True,
    ):
        ax.plot(x, [r[key] for r in rows], "o-", color="tab:blue")
        for r in rows:
            if r.get("trained"):
                ax.plot([r["density"]], [r[key]], "s", color="tab:red", ms=9, zorder=3, label="trained bias")
        ax.set_xscale("log")
        ax.set_xlabel("index density (nnz / codes x items)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def codebook(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """rows: n_codewords, k_u, recall@50, codes_built, build_s."""
    ns = sorted({r["n_codewords"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for n in ns:
        sub = sorted((r for r in rows if r["n_codewords"] == n), key=lambda r: r["k_u"])
        ks = [r["k_u"] for r in sub]
        axes[0].plot(ks, [r["recall@50"] for r in sub], "o-", label=f"N = {n}")
        axes[1].plot(ks, [r["codes_built"] for r in sub], "o-", label=f"N = {n}")
        axes[2].plot(ks, [r["build_s"] for r in sub], "o-", label=f"N = {n}")
    for ax, label in zip(
        axes, ("Recall@50", "distinct codes in use (index rows)", "index build s"), strict=True
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("K_u (codes per user)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def operating_points(
    sparse: list[dict[str, Any]],
    hnsw: list[dict[str, Any]],
    flat: list[dict[str, Any]],
    path: Path,
    title: str,
    sparse_label: str = "SparCode index (bias sweep)",
    sparse_order: str = "qps_1t",
) -> Path:
    """Recall@50 against batch QPS (1 thread): SparCode's points (annotated with `label`, else the density),
    HNSW over efSearch (one line per `hnsw_m` when the rows give it, in efSearch order; annotated with `label`,
    else efSearch), flat. The SparCode line joins its points in `sparse_order` (a row key)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))

    def note(rows: list[dict[str, Any]], text: Any, dy: int) -> None:
        for r in rows:
            ax.annotate(
                text(r),
                (r["qps_1t"], r["recall@50"]),
                fontsize=7,
                alpha=0.7,
                xytext=(3, dy),
                textcoords="offset points",
            )

    if sparse:
        s = sorted(sparse, key=lambda r: r[sparse_order])
        ax.plot([r["qps_1t"] for r in s], [r["recall@50"] for r in s], "o-", label=sparse_label)
        note(s, lambda r: r.get("label") or f"{r['density']:.3g}", 3)
    for m in dict.fromkeys(r.get("hnsw_m") for r in hnsw):
        h = sorted((r for r in hnsw if r.get("hnsw_m") == m), key=lambda r: r["ef_search"])
        ax.plot(
            [r["qps_1t"] for r in h],
            [r["recall@50"] for r in h],
            "s-",
            label="two-tower + Faiss HNSW (efSearch)" + ("" if m is None else f", M = {m}"),
        )
        note(h, lambda r: r.get("label") or str(r["ef_search"]), -9)
    if flat:
        ax.plot(
            [r["qps_1t"] for r in flat],
            [r["recall@50"] for r in flat],
            "*",
            ms=12,
            label="two-tower + Faiss flat (exact)",
        )
    ax.set_xscale("log")
    ax.set_xlabel("queries per second (batch, 1 thread, retrieval only)")
    ax.set_ylabel("Recall@50")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)
