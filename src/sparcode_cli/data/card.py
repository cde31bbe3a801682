"""The data card: a rich table summarising a preprocessed dataset from its meta.json (reusable by any command)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _n(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) else str(x)


def card_rows(meta: dict[str, Any], folder: Path | None = None) -> list[tuple[str, str]]:
    """(label, value) pairs of the card, in display order."""
    c = meta.get("counts", {})
    p = meta.get("params", {})
    f = meta.get("filtering", {})
    rows = [
        ("dataset", f"{meta.get('dataset', '?')}  ({meta.get('title', meta.get('format', ''))})"),
        ("users", _n(meta.get("n_users"))),
        ("items", _n(meta.get("n_items"))),
        ("interactions", _n(meta.get("n_interactions"))),
        ("density", f"{meta.get('density', 0):.5f}"),
    ]
    if f:
        k = p.get("min_count") or 0
        core = f"{k}-core ({f.get('kcore_rounds', 0)} rounds)" if k > 1 else "no k-core filter"
        rows.append(
            (
                "raw → filtered",
                f"{_n(f.get('n_rows_raw'))} rows, {_n(f.get('n_users_raw'))} users, {_n(f.get('n_items_raw'))} items"
                f" → {core}, "
                f"{_n(f.get('n_duplicates_dropped', 0))} duplicates dropped",
            )
        )
    thr = p.get("rating_threshold")
    if thr is not None:
        rows.append(("feedback", f"implicit, rating >= {thr:g}"))
    else:
        rows.append(("feedback", "implicit, every rating" if f.get("has_rating", True) else "implicit"))
    rows.append(
        (
            "split",
            f"{meta.get('split')}  (seed {p.get('seed')}, {'ordered' if meta.get('ordered') else 'unordered'})",
        )
    )
    rows.append(("train", f"{_n(c.get('train_rows'))} interactions of {_n(c.get('train_users'))} users"))
    rows.append(("valid", f"{_n(c.get('valid_users'))} users, {_n(c.get('valid_targets'))} targets"))
    rows.append(("test", f"{_n(c.get('test_users'))} users, {_n(c.get('test_targets'))} targets"))
    if c.get("users_too_short"):
        rows.append(("not evaluated", f"{_n(c['users_too_short'])} users too short to split"))
    feats = []
    if meta.get("n_genres", 1) > 1:
        feats.append(f"genres ({meta['n_genres'] - 1})")
    if meta.get("n_year_buckets", 1) > 1:
        feats.append(f"year bucket ({meta['n_year_buckets'] - 1})")
    vocab = meta.get("user_vocab") or [1, 1, 1]
    for name, v in zip(("gender", "age", "occupation"), vocab, strict=False):
        if v > 1:
            feats.append(f"{name} ({v - 1})")
    rows.append(("features", ", ".join(feats) or "none"))
    rows.append(("max history L", str(p.get("max_history"))))
    if meta.get("n_bad_rows"):
        detail = ", ".join(f"{n} in {name}" for name, n in meta.get("bad_rows", {}).items())
        rows.append(("skipped rows", f"{_n(meta['n_bad_rows'])} malformed ({detail})"))
    if folder is not None:
        rows.append(("folder", str(folder)))
    rows.append(("seconds", f"{meta.get('seconds', 0):.2f}"))
    return rows


def data_card(meta: dict[str, Any], folder: Path | None = None) -> Table:
    table = Table(title=f"data card: {meta.get('data_hash', meta.get('dataset', ''))}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for label, value in card_rows(meta, folder):
        table.add_row(label, value)
    return table


def print_card(meta: dict[str, Any], folder: Path | None = None, console: Console | None = None) -> None:
    (console or Console()).print(data_card(meta, folder))
