"""`sparcode preprocess`: raw files -> implicit feedback -> k-core -> dense ids -> split -> features -> Parquet.

The pipeline (DESIGN §3), each step vectorised in polars:

1. parse the raw format (`parsers.py`);
2. implicit feedback: every rating counts, unless `rating_threshold` is set (keep rating >= X);
3. stable sort by (user, timestamp, original row order) (the `given` split: train rows, then test rows, each
   in file order); a repeated (user, item) pair keeps its first occurrence in that order;
4. iterative k-core (`min_count`, default 5; default 0 = off for the `given` split so Gowalla & co. keep the
   published LightGCN split) on users and items, repeated until stable;
5. dense ids 1..n by sorted raw id (numerically when every raw id is an integer), 0 = padding;
6. split: `time` (RecBole RS [0.8, 0.1, 0.1], order TO, group_by user), `users` (strong generalisation) or
   `given` (the dataset's own train/test; validation carved from train with the seed);
7. features: item genres (ids 1..G over the dataset's sorted genre names) and a release-year bucket
   (0 unknown; year < 1920 -> 1; else 1 + (year - 1915) // 5, i.e. 1920-24 -> 2, 1925-29 -> 3, ...,
   1995-99 -> 17, 2015-19 -> 21); user gender (M = 1, F = 2), age group (1..7: <18, 18-24, 25-34, 35-44,
   45-49, 50-55, 56+; ml-1m's codes 1/18/25/35/45/50/56 map to the same groups) and occupation
   (ml-100k: sorted names -> 1..21; ml-1m: code c -> c + 1). 0 = unknown or absent everywhere.

Output: `<SPARCODE_HOME>/processed/<name>-<hash12>/`, hash12 = sha256 of (format, raw checksums, every
parameter, the digest of the preprocessing code and polars: `provenance.preprocess_digest`). Any change of
that code therefore gives a new folder: an output of older code is never read as a current one. It is built
in a temporary folder beside it and renamed into place; `meta.json` is written last, so its presence means
the folder is complete. A complete folder is reused. `meta.json` also records `content_digest`, a digest of
the tables' values (not of the Parquet bytes), which results files cite. The files and columns are
documented in `dataset.py`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import polars as pl

from sparcode_cli import paths
from sparcode_cli.atomic import file_digest, temp_dir
from sparcode_cli.data import parsers
from sparcode_cli.data.registry import DatasetSpec, FileSpec, get_spec
from sparcode_cli.errors import UserError
from sparcode_cli.provenance import preprocess_digest

SPLITS = ("time", "users", "given")
GENDER_CODES = {"M": 1, "F": 2}
N_AGE_GROUPS = 7
YEAR_BUCKET_RULE = "0 unknown; year < 1920 -> 1; else 1 + (year - 1915) // 5 (5-year buckets from 1920)"

Log = Callable[[str], None]


class RawLike(Protocol):
    """What `download.RawData` provides: the folder of verified raw files and their md5s."""

    path: Path
    checksums: dict[str, str]


@dataclass(frozen=True)
class LocalRaw:
    path: Path
    checksums: dict[str, str]
    source: str = "local"


@dataclass(frozen=True)
class PreprocessParams:
    split: str = "time"
    min_count: int | None = None  # None: 5, or 0 (no filter) for the `given` split
    rating_threshold: float | None = None
    max_history: int = 50  # the L that training uses; recorded, does not truncate stored data
    seed: int = 0
    skip_bad_rows: bool = False

    def effective_min_count(self) -> int:
        if self.min_count is not None:
            return int(self.min_count)
        return 0 if self.split == "given" else 5

    def resolved(self) -> dict[str, Any]:
        """The parameters as recorded in meta.json and hashed into the folder key."""
        d = asdict(self)
        d["min_count"] = self.effective_min_count()
        return d

    def validate(self) -> None:
        if self.split not in SPLITS:
            raise UserError(f"unknown split {self.split!r}", f"Choose one of: {', '.join(SPLITS)}.")
        if self.min_count is not None and self.min_count < 0:
            raise UserError(f"--min-count must be >= 0, got {self.min_count}")
        if self.max_history < 1:
            raise UserError(f"--max-history must be >= 1, got {self.max_history}")
        if self.rating_threshold is not None and not math.isfinite(self.rating_threshold):
            raise UserError(f"--rating-threshold must be a finite number, got {self.rating_threshold}")


# ---------------------------------------------------------------------------------------------- entry


def default_split(fmt: str) -> str:
    return "given" if fmt == "lightgcn" else "time"


def own_file_spec(path: Path) -> DatasetSpec:
    """A registry-like spec for a user's own CSV/Parquet file."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem).strip("-.") or "data"
    return DatasetSpec(
        name=stem,
        title=f"own file {path.name}",
        source="local",
        format=parsers.own_format(path),
        files=(FileSpec(path.name),),
    )


def _looks_like_path(s: str) -> bool:
    return os.sep in s or "/" in s or s.lower().endswith((".csv", ".tsv", ".parquet", ".pq", ".txt"))


def prepare(
    name_or_path: str | Path,
    *,
    split: str | None = None,
    min_count: int | None = None,
    rating_threshold: float | None = None,
    max_history: int = 50,
    seed: int = 0,
    skip_bad_rows: bool = False,
    mirror: str | None = None,
    progress: bool = True,
    log: Log | None = None,
) -> Path:
    """Resolve a registry name (or a CSV/Parquet path), get its verified raw files (downloading them if
    needed) and preprocess them, or reuse the existing folder. Returns the processed folder.

    `split=None` means the dataset's natural split: `given` for the lightgcn format, else `time`.
    """
    target = Path(name_or_path).expanduser()
    if isinstance(name_or_path, Path) or target.is_file() or _looks_like_path(str(name_or_path)):
        if not target.is_file():
            raise UserError(
                f"file {target} not found", "Give a dataset name (see `sparcode datasets`) or a file."
            )
        spec = own_file_spec(target)
        raw: RawLike = LocalRaw(target.parent, {target.name: file_digest(target)})
    else:
        spec = get_spec(str(name_or_path))
        from sparcode_cli.data import download  # lazy: the core below never needs the network

        raw = download.ensure_raw(spec, mirror=mirror, progress=progress)
    params = PreprocessParams(
        split=split or default_split(spec.format),
        min_count=min_count,
        rating_threshold=rating_threshold,
        max_history=max_history,
        seed=seed,
        skip_bad_rows=skip_bad_rows,
    )
    return preprocess_raw(raw, spec, params, log=log)


def folder_key(spec: DatasetSpec, checksums: dict[str, str], params: PreprocessParams) -> str:
    blob = json.dumps(
        {
            "format": spec.format,
            "raw_checksums": dict(sorted(checksums.items())),
            "params": params.resolved(),
            "preprocess_code": preprocess_digest(),
        },
        sort_keys=True,
    )
    return f"{spec.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def preprocess_raw(
    raw: RawLike, spec: DatasetSpec | str, params: PreprocessParams | None = None, *, log: Log | None = None
) -> Path:
    """The core (no network): preprocess verified raw files into the processed cache, or reuse a complete
    folder made from the same raw checksums and parameters. Returns the folder."""
    say = log or (lambda _msg: None)
    spec = get_spec(spec) if isinstance(spec, str) else spec
    params = params or PreprocessParams(split=default_split(spec.format))
    params.validate()
    _check_split(spec, params)
    key = folder_key(spec, raw.checksums, params)
    final = paths.processed_root() / key
    if (final / "meta.json").is_file():
        say(f"reusing {final} (same raw data and parameters)")
        return final

    t0 = time.perf_counter()
    file_name = spec.files[0].name if spec.format in parsers.OWN_FORMATS else None
    parsed = parsers.parse(
        spec.format, Path(raw.path), skip_bad_rows=params.skip_bad_rows, file_name=file_name
    )
    if parsed.n_bad_rows:
        detail = ", ".join(f"{n} in {f}" for f, n in parsed.bad_rows.items())
        say(f"skipped {parsed.n_bad_rows} malformed rows ({detail})")
    tables, built = build(parsed, spec, params)
    meta: dict[str, Any] = {
        "dataset": spec.name,
        "data_hash": key,
        "content_digest": content_digest(tables),
        "preprocess_code": preprocess_digest(),
        "format": spec.format,
        "source": getattr(raw, "source", "local"),
        "params": params.resolved(),
        "raw_checksums": dict(sorted(raw.checksums.items())),
        **built,
        "bad_rows": parsed.bad_rows,
        "n_bad_rows": parsed.n_bad_rows,
    }
    return _write(final, tables, meta, say, t0)


def content_digest(tables: dict[str, pl.DataFrame]) -> str:
    """sha256 (16 hex digits) of every table's columns and values, in table-name order: the same data gives
    the same digest whatever the Parquet writer does with the bytes."""
    h = hashlib.sha256()
    for name in sorted(tables):
        frame = tables[name]
        h.update(f"{name}:{frame.schema}\n".encode())
        h.update(frame.write_ndjson().encode())
    return h.hexdigest()[:16]


def _check_split(spec: DatasetSpec, params: PreprocessParams) -> None:
    if spec.format == "lightgcn" and params.split != "given":
        raise UserError(
            f"{spec.name} has no timestamps or users to split: it ships its own train/test split",
            "Use --split given.",
        )
    if spec.format != "lightgcn" and params.split == "given":
        raise UserError(
            f"--split given needs a dataset with its own train/test split (gowalla, yelp2018, amazon-book); "
            f"{spec.name} has none",
            "Use --split time or --split users.",
        )
    if spec.format == "lightgcn" and params.rating_threshold is not None:
        raise UserError(f"{spec.name} has no ratings, so --rating-threshold cannot apply")


def _write(final: Path, tables: dict[str, pl.DataFrame], meta: dict[str, Any], say: Log, t0: float) -> Path:
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(root, f".{final.name}.", ".tmp")
    try:
        for name, frame in tables.items():
            frame.write_parquet(tmp / f"{name}.parquet")
        meta["seconds"] = round(time.perf_counter() - t0, 3)
        meta["created"] = datetime.now(UTC).isoformat(timespec="seconds")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if final.exists():
            if (final / "meta.json").is_file():  # another process finished first: keep theirs
                say(f"reusing {final} (completed meanwhile)")
                return final
            shutil.rmtree(final)  # an incomplete leftover
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():
                raise
            say(f"reusing {final} (completed meanwhile)")
            return final
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"wrote {final}")
    return final


# ------------------------------------------------------------------------------------------- pipeline


def order_keys(raw: pl.Series) -> pl.Series:
    """An Int64 key per raw id whose order is the dense-id order: the integer value when every raw id is a
    canonical integer ("7", "-3"; not "007"), else the rank of the raw id among the sorted distinct ids."""
    num = raw.cast(pl.Int64, strict=False)
    if num.null_count() == 0 and bool((num.cast(pl.String) == raw).all()):
        return num.rename("key")
    uniq = raw.unique().sort()
    table = pl.DataFrame({"raw": uniq, "key": pl.int_range(len(uniq), dtype=pl.Int64, eager=True)})
    return pl.DataFrame({"raw": raw}).join(table, on="raw", how="left", maintain_order="left")["key"]


def _pair_key(df: pl.DataFrame) -> pl.Expr:
    """One hashable key per (user, item) pair: two keys packed into an Int64 when they fit, else a struct."""
    fits = all(df.height == 0 or (df[c].min() >= 0 and df[c].max() < 2**31) for c in ("ukey", "ikey"))
    return pl.col("ukey") * 2**31 + pl.col("ikey") if fits else pl.struct("ukey", "ikey")


def k_core(df: pl.DataFrame, k: int, user: str = "user", item: str = "item") -> tuple[pl.DataFrame, int]:
    """Iterative k-core on users and items: drop rows of users/items with < k rows until nothing changes.
    Returns the filtered frame (row order kept) and the number of rounds run."""
    rounds = 0
    if k <= 1:
        return df, rounds
    while True:
        rounds += 1
        kept = df.filter((pl.len().over(user) >= k) & (pl.len().over(item) >= k))
        if kept.height == df.height:
            return kept, rounds
        df = kept
        if df.height == 0:
            return df, rounds


def build(
    parsed: parsers.Parsed, spec: DatasetSpec, params: PreprocessParams
) -> tuple[dict[str, pl.DataFrame], dict]:
    """The whole pipeline in memory: returns the output tables and the meta fields it knows."""
    df = parsed.interactions
    n_rows_raw = df.height
    if n_rows_raw == 0:
        raise UserError(f"{spec.name}: the raw data holds no interactions")
    stats: dict[str, Any] = {
        "n_rows_raw": n_rows_raw,
        "n_users_raw": df["user"].n_unique(),
        "n_items_raw": df["item"].n_unique(),
        "has_rating": parsed.has_rating,
        "has_timestamp": parsed.has_timestamp,
    }
    thr = params.rating_threshold
    if thr is not None:
        if not parsed.has_rating:
            raise UserError(f"{spec.name} has no rating column, so --rating-threshold cannot apply")
        df = df.filter(pl.col("rating") >= thr)
        if df.height == 0:
            raise UserError(f"the rating threshold {thr:g} left no interactions; lower --rating-threshold")
    given = params.split == "given"
    # Integer keys ordered like the final dense ids: one sort by them groups users in dense-id order.
    df = df.with_columns(ukey=order_keys(df["user"]), ikey=order_keys(df["item"]))
    if given:
        df = df.with_columns(part_rank=(pl.col("part") == "test").cast(pl.Int8))
    df = df.sort(["ukey", "part_rank" if given else "timestamp", "row"])  # `row` is unique: a total order
    n_before = df.height
    df = df.filter(_pair_key(df).is_first_distinct())
    stats["n_duplicates_dropped"] = n_before - df.height

    k = params.effective_min_count()
    df, rounds = k_core(df, k, "ukey", "ikey")
    stats["kcore_rounds"] = rounds
    if df.height == 0:
        raise UserError(f"the {k}-core filter left no interactions; lower --min-count")

    # dense ids 1..n in key order; rows are already sorted by user key, hence by dense user id
    ikeys = df["ikey"].unique().sort().to_numpy()
    df = df.with_columns(
        uid=(pl.col("ukey") != pl.col("ukey").shift(1)).fill_null(True).cum_sum().cast(pl.Int32),
        iid=pl.Series(np.searchsorted(ikeys, df["ikey"].to_numpy()) + 1, dtype=pl.Int32),
    )
    umap = df.filter(pl.col("uid") != pl.col("uid").shift(1).fill_null(0)).select(
        pl.col("user").alias("raw_id"), "uid"
    )
    imap = df.select(pl.col("item").alias("raw_id"), "iid").unique("iid").sort("iid")
    n_users, n_items = umap.height, imap.height

    if params.split == "time":
        train, valid, test, split_counts = _split_time(df)
    elif params.split == "users":
        train, valid, test, split_counts = _split_users(df, n_users, params.seed)
    else:
        train, valid, test, split_counts = _split_given(df, params.seed)

    items, item_meta = _item_features(parsed, imap)
    users, user_meta = _user_features(parsed, umap)
    tables = {"train": train, "valid": valid, "test": test, "items": items, "users": users}
    n_inter = df.height
    meta = {
        "title": spec.title,
        "n_users": n_users,
        "n_items": n_items,
        "n_interactions": n_inter,
        "density": n_inter / (n_users * n_items),
        "ordered": params.split != "given" and parsed.has_timestamp,
        "split": params.split,
        "counts": split_counts,
        **item_meta,
        **user_meta,
        "filtering": stats,
    }
    return tables, meta


# ---------------------------------------------------------------------------------------------- splits


def _out(df: pl.DataFrame, target: pl.Expr | None = None) -> pl.DataFrame:
    cols = [pl.col("uid").cast(pl.Int32).alias("user"), pl.col("iid").cast(pl.Int32).alias("item"),
            pl.col("timestamp").cast(pl.Int64)]  # fmt: skip
    if target is not None:
        cols.append(target.cast(pl.Boolean).alias("is_target"))
    return df.select(cols)


def _eval_counts(frame: pl.DataFrame) -> tuple[int, int]:
    t = frame.filter(pl.col("is_target"))
    return t["user"].n_unique(), t.height


def _counts(train: pl.DataFrame, valid: pl.DataFrame, test: pl.DataFrame, too_short: int) -> dict[str, int]:
    vu, vt = _eval_counts(valid)
    tu, tt = _eval_counts(test)
    return {
        "train_rows": train.height,
        "train_users": train["user"].n_unique(),
        "valid_users": vu,
        "valid_targets": vt,
        "test_users": tu,
        "test_targets": tt,
        "users_too_short": too_short,
    }


def _split_time(df: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, dict[str, int]]:
    """Per user chronological: the latest floor(0.1 n) (>= 1) to test, the floor(0.1 n) before to valid."""
    n = pl.len().over("uid").cast(pl.Int64)
    h = pl.max_horizontal(n // 10, pl.lit(1))
    pos = pl.int_range(pl.len()).over("uid")
    evaluated = n >= 3
    phase = (
        pl.when(~evaluated | (pos < n - 2 * h)).then(0).when(pos < n - h).then(1).otherwise(2).cast(pl.Int8)
    )
    df = df.with_columns(phase=phase, evaluated=evaluated)
    train = _out(df.filter(pl.col("phase") == 0))
    ev = df.filter(pl.col("evaluated"))
    valid = _out(ev.filter(pl.col("phase") <= 1), pl.col("phase") == 1)
    test = _out(ev, pl.col("phase") == 2)
    too_short = df.filter(~pl.col("evaluated"))["uid"].n_unique()
    return train, valid, test, _counts(train, valid, test, too_short)


def _split_users(
    df: pl.DataFrame, n_users: int, seed: int
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, dict[str, int]]:
    """Users shuffled with the seed: 80/10/10; a held-out user's first 80% is the query, the rest targets."""
    n_hold = max(1, n_users // 10)
    if n_users - 2 * n_hold < 1:
        raise UserError(f"--split users needs at least 3 users after filtering; there are {n_users}")
    perm = np.random.default_rng(seed).permutation(np.arange(1, n_users + 1))
    group = np.zeros(n_users + 1, dtype=np.int8)
    group[perm[:n_hold]] = 1
    group[perm[n_hold : 2 * n_hold]] = 2
    n = pl.len().over("uid").cast(pl.Int64)
    q = pl.min_horizontal(pl.max_horizontal((n * 8) // 10, pl.lit(1)), n - 1)
    df = df.with_columns(pl.Series("group", group[df["uid"].to_numpy()]))
    df = df.with_columns(
        is_target=pl.int_range(pl.len()).over("uid") >= q,
        evaluated=n >= 2,
    )
    train = _out(df.filter(pl.col("group") == 0))
    held = df.filter((pl.col("group") > 0) & pl.col("evaluated"))
    valid = _out(held.filter(pl.col("group") == 1), pl.col("is_target"))
    test = _out(held.filter(pl.col("group") == 2), pl.col("is_target"))
    too_short = df.filter((pl.col("group") > 0) & ~pl.col("evaluated"))["uid"].n_unique()
    return train, valid, test, _counts(train, valid, test, too_short)


def _split_given(
    df: pl.DataFrame, seed: int
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, dict[str, int]]:
    """The dataset's own train/test; a seeded floor(0.1 n) (>= 1 when n >= 2) of each user's training
    items become validation targets. Valid query = the other training items; test query = all of them."""
    key = np.random.default_rng(seed).random(df.height)
    df = df.with_columns(key=pl.Series(key), is_train=pl.col("part") == "train")
    tr = df.filter(pl.col("is_train"))
    n = pl.len().over("uid").cast(pl.Int64)
    n_val = pl.when(n >= 2).then(pl.max_horizontal(n // 10, pl.lit(1))).otherwise(0)
    tr = tr.with_columns(is_val=pl.col("key").rank("ordinal").over("uid") <= n_val)
    train = _out(tr.filter(~pl.col("is_val")))
    val_users = tr.filter(pl.col("is_val"))["uid"].unique()
    valid = _out(tr.filter(pl.col("uid").is_in(val_users.implode())), pl.col("is_val"))
    # sort so that per user the query rows come first, then the targets, each in file order
    valid = valid.with_row_index("_r").sort(["user", "is_target", "_r"]).drop("_r")
    te = df.filter(~pl.col("is_train"))
    test_users = te["uid"].unique()
    test = _out(df.filter(pl.col("uid").is_in(test_users.implode())), ~pl.col("is_train"))
    return train, valid, test, _counts(train, valid, test, 0)


# -------------------------------------------------------------------------------------------- features


def _year_bucket(year: pl.Expr) -> pl.Expr:
    return (
        pl.when(year.is_null() | (year <= 0))
        .then(0)
        .when(year < 1920)
        .then(1)
        .otherwise(1 + (year - 1915) // 5)
        .cast(pl.Int32)
    )


def _item_features(parsed: parsers.Parsed, imap: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, Any]]:
    names = list(parsed.genre_names)
    items = imap.select(pl.col("iid").alias("item"), "raw_id")
    if parsed.items is not None:
        info = parsed.items.unique("raw_id", keep="first", maintain_order=True)
        items = items.join(info, on="raw_id", how="left", maintain_order="left")
        mapping = {g: i for i, g in enumerate(names, start=1)}
        genres = pl.col("genres").fill_null(pl.lit([], dtype=pl.List(pl.String)))
        items = items.with_columns(
            genres=genres.list.eval(pl.element().replace_strict(mapping, default=None, return_dtype=pl.Int32))
            .list.drop_nulls()
            .list.unique()
            .list.sort(),
            year_bucket=_year_bucket(pl.col("year")),
        )
    else:
        items = items.with_columns(
            title=pl.lit(None, pl.String),
            genres=pl.lit([], dtype=pl.List(pl.Int32)),
            year_bucket=pl.lit(0, pl.Int32),
        )
    items = items.select(
        pl.col("item").cast(pl.Int32),
        pl.col("raw_id").cast(pl.String),
        pl.col("title").cast(pl.String),
        pl.col("genres").cast(pl.List(pl.Int32)),
        pl.col("year_bucket").cast(pl.Int32),
    )
    n_year = int(items["year_bucket"].max() or 0) + 1
    return items, {
        "n_genres": len(names) + 1,
        "n_year_buckets": n_year,
        "genre_names": names,
        "year_bucket_rule": YEAR_BUCKET_RULE,
        "items_with_genres": int((items["genres"].list.len() > 0).sum()),
        "items_with_year": int((items["year_bucket"] > 0).sum()),
    }


def _user_features(parsed: parsers.Parsed, umap: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, Any]]:
    users = umap.select(pl.col("uid").alias("user"), "raw_id")
    occ_names = list(parsed.occupation_names)
    if parsed.users is not None:
        info = parsed.users.unique("raw_id", keep="first", maintain_order=True)
        users = users.join(info, on="raw_id", how="left", maintain_order="left")
        occ_map = {o: i for i, o in enumerate(occ_names, start=1)}
        users = users.with_columns(
            gender=pl.col("gender").replace_strict(GENDER_CODES, default=0, return_dtype=pl.Int32),
            age=pl.col("age").fill_null(0),
            occupation=pl.col("occupation").replace_strict(occ_map, default=0, return_dtype=pl.Int32),
        )
        vocab = [len(GENDER_CODES) + 1, N_AGE_GROUPS + 1, len(occ_names) + 1]
    else:
        users = users.with_columns(gender=pl.lit(0), age=pl.lit(0), occupation=pl.lit(0))
        vocab = [1, 1, 1]
    users = users.select(
        pl.col("user").cast(pl.Int32),
        pl.col("raw_id").cast(pl.String),
        *[pl.col(c).fill_null(0).cast(pl.Int32) for c in ("gender", "age", "occupation")],
    )
    return users, {
        "user_vocab": vocab,
        "user_features": ["gender", "age", "occupation"] if parsed.users is not None else [],
        "occupation_names": occ_names,
        "gender_codes": GENDER_CODES,
    }
