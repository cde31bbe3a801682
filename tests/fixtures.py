"""Tiny raw datasets written in each real layout (MovieLens 100K / 1M / 10M / CSV, LightGCN, own files).

Rows are (user, item, rating, timestamp) tuples of ints/floats; items and users carry a few features so the
feature code paths run. Every writer returns the folder (or file) it wrote.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import polars as pl

from sparcode_cli.atomic import file_digest
from sparcode_cli.data.preprocess import LocalRaw

Row = tuple[int, int, float, int]

ML100K_GENRE_COUNT = 19


def grid_rows(
    n_users: int, n_items: int, *, t0: int = 1_000_000, drop: Iterable[tuple[int, int]] = ()
) -> list[Row]:
    """Every user rates every item (ids from 1), user u's item i at time t0 + 10*i + u: dense, survives k-cores."""
    skip = set(drop)
    return [
        (u, i, float(1 + (u + i) % 5), t0 + 10 * i + u)
        for u in range(1, n_users + 1)
        for i in range(1, n_items + 1)
        if (u, i) not in skip
    ]


def raw_of(folder: Path) -> LocalRaw:
    """A RawData-like for a folder: md5 of every file in it."""
    return LocalRaw(folder, {p.name: file_digest(p) for p in sorted(folder.iterdir()) if p.is_file()})


def _item_ids(rows: Sequence[Row]) -> list[int]:
    return sorted({r[1] for r in rows})


def _user_ids(rows: Sequence[Row]) -> list[int]:
    return sorted({r[0] for r in rows})


def write_ml100k(
    folder: Path, rows: Sequence[Row], *, extra_lines: dict[str, list[str]] | None = None
) -> Path:
    """u.data (tab), u.item ('|', latin-1, 24 fields), u.user ('|')."""
    folder.mkdir(parents=True, exist_ok=True)
    data = [f"{u}\t{i}\t{int(r)}\t{t}" for u, i, r, t in rows]
    items = []
    for i in _item_ids(rows):
        flags = ["0"] * ML100K_GENRE_COUNT
        flags[1 + i % 18] = "1"  # one real genre (never "unknown")
        if i % 3 == 0:
            flags[1 + (i + 5) % 18] = "1"
        year = 1930 + 7 * i % 70
        date = f"01-Jan-{year}" if i % 4 else ""
        title = f"Movie {i} ({year})" if i % 5 else f"Caf\xe9 {i}"  # a latin-1 title without a year
        items.append(f"{i}|{title}|{date}||http://x/{i}|" + "|".join(flags))
    occupations = ["writer", "student", "none", "other"]
    users = [f"{u}|{10 + 7 * u % 60}|{'MF'[u % 2]}|{occupations[u % 4]}|0{u:04d}" for u in _user_ids(rows)]
    files = {"u.data": data, "u.item": items, "u.user": users}
    for name, lines in (extra_lines or {}).items():
        files[name] = files[name] + lines
    for name, lines in files.items():
        (folder / name).write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return folder


def write_ml1m(folder: Path, rows: Sequence[Row], *, users: bool = True, float_ratings: bool = False) -> Path:
    """ratings.dat / movies.dat / users.dat, '::'-separated, latin-1 (ml-10m: users=False)."""
    folder.mkdir(parents=True, exist_ok=True)
    rating = (lambda r: f"{r:.1f}") if float_ratings else (lambda r: str(int(r)))
    lines = [f"{u}::{i}::{rating(r)}::{t}" for u, i, r, t in rows]
    (folder / "ratings.dat").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    genres = ["Action", "Comedy", "Drama", "Children's", "Film-Noir"]
    movies = []
    for i in _item_ids(rows):
        g = "(no genres listed)" if i % 7 == 0 else "|".join(sorted({genres[i % 5], genres[(i * 3) % 5]}))
        movies.append(f"{i}::Film {i}, The ({1950 + i % 50})::{g}")
    (folder / "movies.dat").write_bytes(("\n".join(movies) + "\n").encode("latin-1"))
    if users:
        ages = [1, 18, 25, 35, 45, 50, 56]
        us = [f"{u}::{'MF'[u % 2]}::{ages[u % 7]}::{u % 21}::5{u:04d}" for u in _user_ids(rows)]
        (folder / "users.dat").write_bytes(("\n".join(us) + "\n").encode("latin-1"))
    return folder


def write_movielens_csv(folder: Path, rows: Sequence[Row], *, ratings_extra: list[str] | None = None) -> Path:
    """ratings.csv + movies.csv with headers; some titles quoted (a comma, an escaped quote)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["userId,movieId,rating,timestamp"] + [f"{u},{i},{r:.1f},{t}" for u, i, r, t in rows]
    lines += ratings_extra or []
    (folder / "ratings.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    movies = ["movieId,title,genres"]
    for i in _item_ids(rows):
        if i % 4 == 0:
            title = f'"Film {i}, The ({1990 + i % 20})"'
        elif i % 4 == 1:
            title = f'"Say ""Hi"" {i} ({1990 + i % 20})"'
        elif i % 4 == 2:
            title = f"Plain {i}"  # no year
        else:
            title = f"Film {i} ({1990 + i % 20})"
        genres = "(no genres listed)" if i % 6 == 0 else ("Drama|Sci-Fi" if i % 2 else "Comedy")
        movies.append(f"{i},{title},{genres}")
    (folder / "movies.csv").write_text("\n".join(movies) + "\n", encoding="utf-8")
    return folder


def write_lightgcn(folder: Path, train: dict[int, list[int]], test: dict[int, list[int]]) -> Path:
    """train.txt / test.txt: `user item item ...` per line (a user may have no items)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.txt", train), ("test.txt", test)):
        text = "\n".join(" ".join(str(x) for x in [u, *items]) for u, items in part.items()) + "\n"
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def write_own_csv(
    path: Path, rows: Sequence[Row], *, columns: Sequence[str] = ("user", "item", "rating", "timestamp")
) -> Path:
    """A user's CSV with the given columns (any of user, item, rating, timestamp, in any order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    idx = {"user": 0, "item": 1, "rating": 2, "timestamp": 3}
    lines = [",".join(columns)]
    for row in rows:
        lines.append(",".join(f"u{row[0]}" if c == "user" else str(row[idx[c]]) for c in columns))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_own_parquet(path: Path, rows: Sequence[Row]) -> Path:
    """A user's Parquet file: integer user/item ids, float rating, integer timestamp."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(
        {
            "user": [r[0] for r in rows],
            "item": [r[1] for r in rows],
            "rating": [float(r[2]) for r in rows],
            "timestamp": [int(r[3]) for r in rows],
        },
        schema={"user": pl.Int64, "item": pl.Int64, "rating": pl.Float64, "timestamp": pl.Int64},
    ).write_parquet(path)
    return path
