"""Raw-format parsers: each real layout, malformed rows (file + line), --skip-bad-rows, and fuzzing."""

from __future__ import annotations

import string
import tempfile
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparcode_cli.data import parsers
from sparcode_cli.errors import UserError
from tests.fixtures import (
    grid_rows,
    write_lightgcn,
    write_ml1m,
    write_ml100k,
    write_movielens_csv,
    write_own_csv,
    write_own_parquet,
)

COLUMNS = ["user", "item", "timestamp", "rating", "row"]


def _check_frame(df: pl.DataFrame) -> None:
    assert df.columns[:5] == COLUMNS or set(COLUMNS) <= set(df.columns)
    assert df.schema["user"] == pl.String and df.schema["item"] == pl.String
    assert df.schema["timestamp"] == pl.Int64 and df.schema["rating"] == pl.Float64
    assert df["row"].to_list() == list(range(df.height))


def test_ml100k_layout(tmp_path: Path) -> None:
    rows = grid_rows(4, 6)
    p = parsers.parse("ml-100k", write_ml100k(tmp_path, rows))
    _check_frame(p.interactions)
    assert p.interactions.height == 24
    first = p.interactions.row(0, named=True)
    assert (first["user"], first["item"], first["rating"], first["timestamp"]) == ("1", "1", 3.0, 1_000_011)
    items = {r["raw_id"]: r for r in p.items.iter_rows(named=True)}
    assert len(items) == 6
    assert items["5"]["title"] == "Caf\xe9 5"  # latin-1 decoded
    assert items["5"]["year"] == 1965  # from the release date (title has none)
    assert items["4"]["year"] == 1958  # empty date -> year from "(1958)" in the title
    assert items["3"]["genres"] == sorted(items["3"]["genres"]) or len(items["3"]["genres"]) == 2
    assert "unknown" not in p.genre_names and len(p.genre_names) == 18
    users = {r["raw_id"]: r for r in p.users.iter_rows(named=True)}
    assert users["1"] == {"raw_id": "1", "gender": "F", "age": 1, "occupation": "student"}  # age 17 -> <18
    assert users["2"]["age"] == 2 and users["2"]["gender"] == "M"  # age 24 -> 18-24
    assert p.occupation_names == ["none", "other", "student", "writer"]


def test_ml100k_age_groups() -> None:
    ages = pl.Series([None, 5, 17, 18, 24, 25, 34, 35, 44, 45, 49, 50, 55, 56, 90])
    got = pl.DataFrame({"a": ages}).select(parsers._age_group(pl.col("a")).alias("g"))["g"].to_list()
    assert got == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7]


def test_ml1m_and_ml10m_layout(tmp_path: Path) -> None:
    rows = grid_rows(8, 7)
    p = parsers.parse("ml-1m", write_ml1m(tmp_path / "1m", rows))
    _check_frame(p.interactions)
    assert p.interactions.height == 56
    users = {r["raw_id"]: r for r in p.users.iter_rows(named=True)}
    assert users["7"]["age"] == 1 and users["1"]["age"] == 2 and users["6"]["age"] == 7  # codes 1, 18, 56
    assert (
        users["1"]["occupation"] == "academic/educator" and users["7"]["occupation"] == "executive/managerial"
    )
    items = {r["raw_id"]: r for r in p.items.iter_rows(named=True)}
    assert (
        items["7"]["genres"] == []
        and items["1"]["title"] == "Film 1, The (1951)"
        and items["1"]["year"] == 1951
    )
    assert p.genre_names == sorted(p.genre_names) and "Children's" in p.genre_names
    p10 = parsers.parse("ml-10m", write_ml1m(tmp_path / "10m", rows, users=False, float_ratings=True))
    assert p10.users is None and p10.interactions.height == 56


def test_movielens_csv_layout(tmp_path: Path) -> None:
    rows = grid_rows(3, 8)
    p = parsers.parse("movielens-csv", write_movielens_csv(tmp_path, rows))
    _check_frame(p.interactions)
    assert p.interactions.height == 24
    items = {r["raw_id"]: r for r in p.items.iter_rows(named=True)}
    assert items["4"]["title"] == "Film 4, The (1994)" and items["4"]["year"] == 1994
    assert items["1"]["title"] == 'Say "Hi" 1 (1991)' and items["1"]["genres"] == ["Drama", "Sci-Fi"]
    assert items["2"]["year"] is None
    assert items["6"]["genres"] == []
    assert p.genre_names == ["Comedy", "Drama", "Sci-Fi"]


def test_lightgcn_layout(tmp_path: Path) -> None:
    folder = write_lightgcn(tmp_path, {0: [0, 1, 2], 1: [], 2: [3]}, {0: [4], 1: [0, 1], 2: []})
    p = parsers.parse("lightgcn", folder)
    df = p.interactions
    _check_frame(df)
    assert df.select("user", "item", "part").rows() == [
        ("0", "0", "train"), ("0", "1", "train"), ("0", "2", "train"), ("2", "3", "train"),
        ("0", "4", "test"), ("1", "0", "test"), ("1", "1", "test"),
    ]  # fmt: skip
    assert not p.has_timestamp and df["rating"].null_count() == df.height


def test_own_csv_and_parquet(tmp_path: Path) -> None:
    rows = grid_rows(2, 3)
    csv = write_own_csv(tmp_path / "mine.csv", rows, columns=("item", "timestamp", "user"))
    p = parsers.parse("own-csv", csv)
    assert p.has_timestamp and not p.has_rating
    assert p.interactions.select("user", "item").row(0) == ("u1", "1")
    assert p.interactions["rating"].null_count() == 6
    no_ts = write_own_csv(tmp_path / "nots.csv", rows, columns=("user", "item"))
    q = parsers.parse("own-csv", no_ts)
    assert not q.has_timestamp and q.interactions["timestamp"].to_list() == [0] * 6
    pq = parsers.parse("own-parquet", write_own_parquet(tmp_path / "mine.parquet", rows))
    assert pq.interactions.select("user", "item", "rating", "timestamp").row(5) == ("2", "3", 1.0, 1_000_032)


def test_own_file_without_user_column(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("who,what\n1,2\n")
    with pytest.raises(UserError, match="no 'user' or 'item' column"):
        parsers.parse("own-csv", path)


def test_blank_lines_and_crlf(tmp_path: Path) -> None:
    (tmp_path / "ratings.csv").write_bytes(
        b"userId,movieId,rating,timestamp\r\n1,2,3.5,10\r\n\r\n1,3,4,11\r\n"
    )
    (tmp_path / "movies.csv").write_bytes(b"movieId,title,genres\r\n2,A (1999),Drama\r\n3,B,Comedy\r\n")
    p = parsers.parse("movielens-csv", tmp_path)
    assert p.interactions.select("item", "rating").rows() == [("2", 3.5), ("3", 4.0)]
    assert p.items["genres"].to_list() == [["Drama"], ["Comedy"]]


# ------------------------------------------------------------------------------------------ malformed


@pytest.mark.parametrize(
    ("bad", "line"),
    [("1\t2\t3", 3), ("1\tx\t3\t4", 3), ("1\t2\t3\t4\t5", 3), ("1\t2\tnan\t4", 3), ("1\t2\t3\t4.5", 3)],
)
def test_malformed_u_data_names_file_and_line(tmp_path: Path, bad: str, line: int) -> None:
    folder = write_ml100k(tmp_path, grid_rows(2, 2)[:2])
    text = (folder / "u.data").read_text().splitlines()
    (folder / "u.data").write_text("\n".join([*text, bad, *text]) + "\n")
    with pytest.raises(UserError) as err:
        parsers.parse("ml-100k", folder)
    assert f"u.data: line {line}:" in err.value.message and "skip-bad-rows" in str(err.value)
    p = parsers.parse("ml-100k", folder, skip_bad_rows=True)
    assert p.bad_rows == {"u.data": 1} and p.interactions.height == 4
    assert p.interactions["row"].to_list() == [0, 1, 2, 3]


def test_malformed_csv_counts_header_line(tmp_path: Path) -> None:
    folder = write_movielens_csv(tmp_path, grid_rows(1, 3), ratings_extra=["1,9,4.0", "oops", "2,9,4.0,5"])
    with pytest.raises(UserError, match=r"ratings\.csv: line 5: malformed row '1,9,4\.0'"):
        parsers.parse("movielens-csv", folder)
    p = parsers.parse("movielens-csv", folder, skip_bad_rows=True)
    assert p.n_bad_rows == 2 and p.interactions.height == 4


def test_bad_header_and_bad_utf8(tmp_path: Path) -> None:
    folder = write_movielens_csv(tmp_path, grid_rows(1, 2))
    (folder / "ratings.csv").write_text("user,item\n1,2,3,4\n")
    with pytest.raises(UserError, match=r"ratings\.csv: line 1: expected the header"):
        parsers.parse("movielens-csv", folder)
    (folder / "ratings.csv").write_bytes(b"userId,movieId,rating,timestamp\n1,2,3,4\n1,\xff3,3,4\n")
    with pytest.raises(UserError, match=r"ratings\.csv: line 3: not valid UTF-8"):
        parsers.parse("movielens-csv", folder)
    p = parsers.parse("movielens-csv", folder, skip_bad_rows=True)
    assert p.interactions.height == 1 and p.bad_rows == {"ratings.csv": 2}  # the decode error + the bad id


def test_malformed_lightgcn_and_dat_and_own(tmp_path: Path) -> None:
    folder = write_lightgcn(tmp_path / "lg", {0: [1, 2], 1: [3]}, {0: [3]})
    (folder / "test.txt").write_text("0 3\n\n1 2 x\n")
    with pytest.raises(UserError, match=r"test\.txt: line 3:"):
        parsers.parse("lightgcn", folder)
    assert parsers.parse("lightgcn", folder, skip_bad_rows=True).bad_rows == {"test.txt": 1}

    folder = write_ml1m(tmp_path / "1m", grid_rows(2, 2))
    (folder / "movies.dat").write_text("1::A (1999)::Drama\nno separators here\n2::B::Comedy\n")
    with pytest.raises(UserError, match=r"movies\.dat: line 2:"):
        parsers.parse("ml-1m", folder)

    csv = tmp_path / "own.csv"
    csv.write_text("user,item,timestamp\na,b,1\nc,d,yesterday\n")
    with pytest.raises(UserError, match=r"own\.csv: line 3:"):
        parsers.parse("own-csv", csv)


def test_missing_raw_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"u\.data is missing"):
        parsers.parse("ml-100k", tmp_path)


# ------------------------------------------------------------------------------------------- fuzzing

_line_text = st.text(alphabet=string.printable.replace("\n", "").replace("\r", "") + "é:|\t", max_size=40)
_lines = st.lists(
    st.one_of(_line_text, st.sampled_from(["1\t2\t3\t4", "1::2::3::4", "1,2,3.5,4", "0 1 2"])), max_size=8
)

_LAYOUTS = {
    "ml-100k": ("u.data", "u.item", "u.user"),
    "ml-1m": ("ratings.dat", "movies.dat", "users.dat"),
    "ml-10m": ("ratings.dat", "movies.dat"),
    "movielens-csv": ("ratings.csv", "movies.csv"),
    "lightgcn": ("train.txt", "test.txt"),
    "own-csv": ("own.csv",),
}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from(sorted(_LAYOUTS)),
    contents=st.lists(
        st.one_of(_lines.map(lambda ls: "\n".join(ls).encode()), st.binary(max_size=60)),
        min_size=3,
        max_size=3,
    ),
    skip=st.booleans(),
)
def test_fuzz_parsers_raise_only_user_errors(fmt: str, contents: list[bytes], skip: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, data in zip(_LAYOUTS[fmt], contents, strict=False):
            (folder / name).write_bytes(data)
        source = folder / "own.csv" if fmt == "own-csv" else folder
        try:
            p = parsers.parse(fmt, source, skip_bad_rows=skip)
        except UserError:
            return
        _check_frame(p.interactions)
        assert p.interactions["user"].null_count() == 0 and p.interactions["item"].null_count() == 0


@settings(max_examples=15, deadline=None)
@given(
    cells=st.lists(
        st.tuples(st.one_of(st.none(), st.integers(), st.text(max_size=5)), st.integers(-5, 5)), max_size=6
    )
)
def test_fuzz_own_parquet(cells: list[tuple[object, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.parquet"
        pl.DataFrame(
            {"user": [str(c[0]) if c[0] is not None else None for c in cells], "item": [c[1] for c in cells]},
            schema={"user": pl.String, "item": pl.Int64},
        ).write_parquet(path)
        try:
            p = parsers.parse("own-parquet", path)
        except UserError as exc:
            assert "row " in exc.message
            return
        _check_frame(p.interactions)
