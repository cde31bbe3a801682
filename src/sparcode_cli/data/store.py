"""Load a preprocessed folder (see `dataset.py` for its files) into a `Dataset`. Vectorised numpy, no
per-row Python loops, so a million-row dataset loads in well under a second."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from sparcode_cli.data.dataset import Dataset, EvalSplit, Features, Ragged
from sparcode_cli.errors import UserError

RERUN = "Re-run `sparcode preprocess <dataset>` to rebuild it."

_COLUMNS = {
    "train": ("user", "item", "timestamp"),
    "valid": ("user", "item", "timestamp", "is_target"),
    "test": ("user", "item", "timestamp", "is_target"),
    "items": ("item", "raw_id", "title", "genres", "year_bucket"),
    "users": ("user", "raw_id", "gender", "age", "occupation"),
}


def _read(folder: Path, name: str) -> pl.DataFrame:
    path = folder / f"{name}.parquet"
    if not path.is_file():
        raise UserError(f"{path} is missing: the preprocessed folder is incomplete", RERUN)
    try:
        df = pl.read_parquet(path)
    except Exception as exc:  # polars raises several kinds for a damaged file
        raise UserError(f"{path} is not a readable Parquet file ({type(exc).__name__})", RERUN) from exc
    missing = [c for c in _COLUMNS[name] if c not in df.columns]
    if missing:
        raise UserError(f"{path} lacks the column(s) {', '.join(missing)}", RERUN)
    return df


def read_meta(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise UserError(
            f"{folder} is not a complete preprocessed dataset (no meta.json)",
            RERUN if Path(folder).is_dir() else "Run `sparcode preprocess <dataset>` first.",
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not valid JSON", RERUN) from exc
    if not isinstance(meta, dict) or not {"n_users", "n_items", "dataset"} <= meta.keys():
        raise UserError(f"{path} lacks n_users / n_items / dataset", RERUN)
    return meta


def _ids(df: pl.DataFrame, col: str, n: int, path: str) -> np.ndarray:
    a = df[col].cast(pl.Int64).to_numpy()
    if len(a) and (a.min() < 1 or a.max() > n):
        raise UserError(f"{path}: {col} ids outside 1..{n}", RERUN)
    return a


def _group(keys: np.ndarray, values: np.ndarray, rows: np.ndarray, n_keys: int) -> Ragged:
    """Ragged with one row per entry of sorted `rows` (ids in 0..n_keys); row r holds the values whose key is
    rows[r], in their order. The files are written grouped by user, so the stable sort is usually skipped."""
    row_of = np.full(n_keys + 1, -1, dtype=np.int64)
    row_of[rows] = np.arange(len(rows))
    if len(keys) and bool((row_of[keys] < 0).any()):  # keys with no row are left out
        keep = row_of[keys] >= 0
        keys, values = keys[keep], values[keep]
    if len(keys) > 1 and not bool(np.all(keys[1:] >= keys[:-1])):
        order = np.argsort(keys, kind="stable")
        keys, values = keys[order], values[order]
    counts = np.bincount(row_of[keys], minlength=len(rows)) if len(keys) else np.zeros(len(rows), np.int64)
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return Ragged(indptr, values.astype(np.int64, copy=False))


def _eval_split(df: pl.DataFrame, name: str, n_users: int, n_items: int, folder: Path) -> EvalSplit:
    label = str(folder / f"{name}.parquet")
    users = _ids(df, "user", n_users, label)
    items = _ids(df, "item", n_items, label)
    target = df["is_target"].fill_null(False).to_numpy().astype(bool)
    eval_users = np.unique(users[target])
    keep_q = ~target  # query rows of users without targets are left out by _group
    return EvalSplit(
        name=name,
        users=eval_users.astype(np.int64),
        query=_group(users[keep_q], items[keep_q], eval_users, n_users),
        targets=_group(users[target], items[target], eval_users, n_users),
    )


def _features(
    items: pl.DataFrame, users: pl.DataFrame, meta: dict[str, Any], n_items: int, n_users: int
) -> Features:
    item_ids = items["item"].cast(pl.Int64).to_numpy()
    genres = items["genres"]
    lengths = genres.list.len().fill_null(0).cast(pl.Int64).to_numpy()
    flat = genres.explode().drop_nulls().cast(pl.Int64).to_numpy()
    width = max(1, int(lengths.max()) if len(lengths) else 1)
    item_genres = np.zeros((n_items + 1, width), dtype=np.int64)
    if len(flat):
        row = np.repeat(item_ids, lengths)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        col = np.arange(len(flat)) - starts
        item_genres[row, col] = flat
    item_year = np.zeros(n_items + 1, dtype=np.int64)
    item_year[item_ids] = items["year_bucket"].fill_null(0).cast(pl.Int64).to_numpy()
    user_feats = np.zeros((n_users + 1, 3), dtype=np.int64)
    user_ids = users["user"].cast(pl.Int64).to_numpy()
    user_feats[user_ids] = users.select(
        pl.col(c).fill_null(0).cast(pl.Int64) for c in ("gender", "age", "occupation")
    ).to_numpy()
    n_genres = int(meta.get("n_genres", int(item_genres.max()) + 1))
    n_year = int(meta.get("n_year_buckets", int(item_year.max()) + 1))
    vocab = meta.get("user_vocab") or [int(user_feats[:, j].max()) + 1 for j in range(3)]
    return Features(
        item_genres=item_genres,
        item_year=item_year,
        user_feats=user_feats,
        n_genres=n_genres,
        n_year_buckets=n_year,
        user_vocab=(int(vocab[0]), int(vocab[1]), int(vocab[2])),
    )


def _raw_ids(df: pl.DataFrame, col: str, n: int) -> np.ndarray:
    out = np.empty(n + 1, dtype=object)
    out[0] = ""
    out[df[col].cast(pl.Int64).to_numpy()] = df["raw_id"].cast(pl.String).fill_null("").to_numpy()
    return out


def load_dataset(folder: str | Path) -> Dataset:
    """Read a folder written by `sparcode preprocess`; a missing or damaged file is a UserError."""
    folder = Path(folder)
    meta = read_meta(folder)
    n_users, n_items = int(meta["n_users"]), int(meta["n_items"])
    train_df = _read(folder, "train")
    valid_df = _read(folder, "valid")
    test_df = _read(folder, "test")
    items_df = _read(folder, "items")
    users_df = _read(folder, "users")
    if items_df.height != n_items or users_df.height != n_users:
        raise UserError(f"{folder}: items/users tables do not match meta.json's n_items/n_users", RERUN)
    _ids(items_df, "item", n_items, str(folder / "items.parquet"))
    _ids(users_df, "user", n_users, str(folder / "users.parquet"))
    tr_users = _ids(train_df, "user", n_users, str(folder / "train.parquet"))
    tr_items = _ids(train_df, "item", n_items, str(folder / "train.parquet"))
    train = _group(tr_users, tr_items, np.arange(n_users + 1), n_users)
    return Dataset(
        name=str(meta["dataset"]),
        data_hash=str(meta.get("data_hash", folder.name)),
        n_users=n_users,
        n_items=n_items,
        ordered=bool(meta.get("ordered", True)),
        train=train,
        valid=_eval_split(valid_df, "valid", n_users, n_items, folder),
        test=_eval_split(test_df, "test", n_users, n_items, folder),
        features=_features(items_df, users_df, meta, n_items, n_users),
        item_raw_ids=_raw_ids(items_df, "item", n_items),
        user_raw_ids=_raw_ids(users_df, "user", n_users),
        meta=meta,
    )
