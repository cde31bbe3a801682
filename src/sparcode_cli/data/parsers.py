"""Raw-format parsers: one per registry `format`, plus a user's own CSV/Parquet file.

Every parser returns a `Parsed`: a polars frame of interactions

    user:str (raw id), item:str (raw id), timestamp:int64 (0 if none), rating:float64 (null if none),
    row:int64 (original order across the files), and for the lightgcn format part:str ("train"/"test")

plus optional item and user feature frames (raw values; `preprocess` turns them into ids):

    items: raw_id:str, title:str|null, genres:list[str], year:int32|null
    users: raw_id:str, gender:str|null ("M"/"F"), age:int32 (group 1..7, 0 unknown), occupation:str|null

Files are read as text lines and split with polars string operations (vectorised), so a malformed row is
reported with its file and 1-based line number (a header counts as line 1). With `skip_bad_rows` the bad
rows are dropped instead and counted per file in `Parsed.bad_rows`. Blank lines are ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from sparcode_cli.errors import UserError

# u.genre order; "unknown" (flag 0) is treated as "no genre", like MovieLens' "(no genres listed)".
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
NO_GENRE = ("unknown", "(no genres listed)")

# ml-1m users.dat occupation codes 0..20 (README): code c -> occupation id c + 1.
ML1M_OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student", "customer service",
    "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer",
    "programmer", "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer",
    "tradesman/craftsman", "unemployed", "writer",
)  # fmt: skip
# ml-1m age codes -> group 1..7; ml-100k raw ages are bucketed into the same groups.
ML1M_AGE_CODES = {1: 1, 18: 2, 25: 3, 35: 4, 45: 5, 50: 6, 56: 7}
AGE_GROUP_EDGES = (18, 25, 35, 45, 50, 56)  # <18 -> 1, 18-24 -> 2, ..., 50-55 -> 6, 56+ -> 7

OWN_FORMATS = ("own-csv", "own-parquet")
FORMATS = ("ml-100k", "ml-1m", "ml-10m", "movielens-csv", "lightgcn", *OWN_FORMATS)

_YEAR_IN_TITLE = r"\((\d{4})(?:[-–]\d{4})?\)\s*$"
_INT = pl.Int64
SKIP_HINT = "Fix the file, or pass --skip-bad-rows to drop malformed rows (they are counted)."


@dataclass
class Parsed:
    interactions: pl.DataFrame
    items: pl.DataFrame | None = None
    users: pl.DataFrame | None = None
    genre_names: list[str] = field(default_factory=list)  # the dataset's genre vocabulary, sorted
    occupation_names: list[str] = field(default_factory=list)  # id = index + 1
    has_timestamp: bool = True
    has_rating: bool = True
    bad_rows: dict[str, int] = field(default_factory=dict)  # file name -> rows dropped

    @property
    def n_bad_rows(self) -> int:
        return sum(self.bad_rows.values())


# --------------------------------------------------------------------------------------------- reading


class _Ctx:
    """Bad-row policy for one parse: raise on the first bad line, or drop and count."""

    def __init__(self, skip: bool) -> None:
        self.skip = skip
        self.bad_rows: dict[str, int] = {}

    def check(self, path: Path, frame: pl.DataFrame, bad: pl.Series, expected: str) -> pl.DataFrame:
        """`frame` has `line_no` and `line`; rows where `bad` is true are malformed."""
        bad = bad.fill_null(True)
        n_bad = int(bad.sum())
        if n_bad == 0:
            return frame
        if not self.skip:
            first = int(bad.arg_true()[0])
            line_no = int(frame["line_no"][first])
            text = frame["line"][first]
            shown = text if len(text) <= 120 else text[:117] + "..."
            where = f"line {line_no}" if line_no > 0 else f"row {-line_no}"
            raise UserError(f"{path}: {where}: malformed row {shown!r} (expected {expected})", SKIP_HINT)
        self.bad_rows[path.name] = self.bad_rows.get(path.name, 0) + n_bad
        return frame.filter(~bad)

    def fail_line(self, path: Path, line_no: int, why: str) -> None:
        if not self.skip:
            raise UserError(f"{path}: line {line_no}: {why}", SKIP_HINT)
        self.bad_rows[path.name] = self.bad_rows.get(path.name, 0) + 1


def _require(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise UserError(
            f"raw file {path} is missing", "Run `sparcode download <dataset>` again (or --force)."
        )
    return path


def read_lines(path: Path, ctx: _Ctx, encoding: str = "utf-8") -> pl.DataFrame:
    """Non-blank lines of a text file: line_no:int64 (1-based), line:str ('\\r' endings stripped).

    encoding "latin-1" means: UTF-8 if the file decodes as UTF-8, else ISO-8859-1 (MovieLens .dat/u.item).
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if not data.strip():
        return pl.DataFrame({"line_no": [], "line": []}, schema={"line_no": _INT, "line": pl.String})
    if b"\r" in data:  # a lone '\r' is a line end for some readers and not others: make it one everywhere
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    try:
        lines = _lines_of(data)
    except pl.exceptions.PolarsError:  # not UTF-8 (read_lines validates it)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            if encoding == "latin-1":
                data = data.decode("latin-1").encode("utf-8")
            else:
                line_no = data[: exc.start].count(b"\n") + 1
                ctx.fail_line(path, line_no, "not valid UTF-8 text")
                data = data.decode("utf-8", errors="replace").encode("utf-8")
            lines = _lines_of(data)
        else:  # pragma: no cover - read_lines on valid UTF-8 should not fail
            raise
    lines = lines.with_columns(pl.col("line_no").cast(_INT), pl.col("line").str.strip_chars_end("\r"))
    return lines.filter(pl.col("line").str.strip_chars() != "")


def _lines_of(data: bytes) -> pl.DataFrame:
    return pl.read_lines(data, name="line", row_index_name="line_no", row_index_offset=1)


def _split(lines: pl.DataFrame, sep: str, n: int) -> tuple[pl.DataFrame, pl.Series]:
    """Split each line into exactly `n` fields f0..f{n-1}; the mask marks lines with another count."""
    wrong = lines["line"].str.count_matches(sep, literal=True) != n - 1
    fields = lines.select(pl.col("line").str.split_exact(sep, n - 1).alias("s")).unnest("s")
    fields.columns = [f"f{i}" for i in range(n)]
    return pl.concat([lines, fields], how="horizontal"), wrong


def _int(col: str) -> pl.Expr:
    return pl.col(col).str.strip_chars().cast(_INT, strict=False)


def _float(col: str) -> pl.Expr:
    return pl.col(col).str.strip_chars().cast(pl.Float64, strict=False)


def _bad(df: pl.DataFrame, *conds: pl.Expr) -> pl.Series:
    """OR of `conds` evaluated on df (nulls count as bad)."""
    expr = pl.lit(False)
    for c in conds:
        expr = expr | c.fill_null(True)
    return df.select(expr.alias("bad"))["bad"]


def _finite(col: str) -> pl.Expr:
    return pl.col(col).is_null() | ~pl.col(col).is_finite()


def _interactions(df: pl.DataFrame, *, rating: bool, timestamp: bool) -> pl.DataFrame:
    """Typed interaction frame from a frame with user_i/item_i (int ids) and optional rating_f, ts_i."""
    return df.select(
        pl.col("user_i").cast(pl.String).alias("user"),
        pl.col("item_i").cast(pl.String).alias("item"),
        (pl.col("ts_i") if timestamp else pl.lit(0, _INT)).cast(_INT).alias("timestamp"),
        (pl.col("rating_f") if rating else pl.lit(None, pl.Float64)).cast(pl.Float64).alias("rating"),
    ).with_columns(pl.int_range(pl.len(), dtype=_INT).alias("row"))


def _ratings_file(path: Path, ctx: _Ctx, sep: str, *, header: str | None = None) -> pl.DataFrame:
    """user<sep>item<sep>rating<sep>timestamp, integer ids and timestamp, float rating."""
    lines = read_lines(path, ctx)
    if header is not None:
        lines = _check_header(path, lines, header, ctx)
    df, wrong = _split(lines, sep, 4)
    df = df.with_columns(user_i=_int("f0"), item_i=_int("f1"), rating_f=_float("f2"), ts_i=_int("f3"))
    bad = _bad(df, pl.lit(wrong), pl.col("user_i").is_null(), pl.col("item_i").is_null(), _finite("rating_f"),
               pl.col("ts_i").is_null())  # fmt: skip
    expected = f"4 fields separated by {sep!r}: integer user id, integer item id, rating, integer timestamp"
    df = ctx.check(path, df, bad, expected)
    return _interactions(df, rating=True, timestamp=True)


def _check_header(path: Path, lines: pl.DataFrame, header: str, ctx: _Ctx) -> pl.DataFrame:
    if lines.height == 0 or lines["line_no"][0] != 1:
        return lines
    first = lines["line"][0].strip()
    if first.replace('"', "").replace(" ", "").lower() != header.lower():
        ctx.fail_line(path, 1, f"expected the header {header!r}, found {first[:80]!r}")
    return lines.slice(1)


def _year_from_title(title: pl.Expr) -> pl.Expr:
    return title.str.extract(_YEAR_IN_TITLE, 1).cast(pl.Int32, strict=False)


def _genre_list(genres: pl.Expr) -> pl.Expr:
    """'A|B' -> ['A', 'B']; '(no genres listed)' and '' -> []."""
    return genres.str.strip_chars().str.split("|").list.eval(
        pl.element().str.strip_chars().filter((pl.element().str.strip_chars() != "") & ~pl.element().is_in(NO_GENRE))
    )  # fmt: skip


def _genre_vocab(items: pl.DataFrame) -> list[str]:
    if items.height == 0:
        return []
    return sorted(set(items["genres"].explode().drop_nulls().to_list()))


def _age_group(age: pl.Expr) -> pl.Expr:
    """Raw age in years -> 1..7 (<18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+); 0 if unknown."""
    out = pl.when(age.is_null() | (age < 0)).then(0)
    out = out.when(age < AGE_GROUP_EDGES[0]).then(1)
    for g, edge in enumerate(AGE_GROUP_EDGES[1:], start=2):
        out = out.when(age < edge).then(g)
    return out.otherwise(7).cast(pl.Int32)


# --------------------------------------------------------------------------------------------- formats


def parse_ml100k(folder: Path, ctx: _Ctx) -> Parsed:
    inter = _ratings_file(_require(folder, "u.data"), ctx, "\t")

    path = _require(folder, "u.item")
    df, wrong = _split(read_lines(path, ctx, "latin-1"), "|", 24)
    flags = [f"f{5 + g}" for g in range(19)]
    df = df.with_columns(_int("f0").alias("id_i"), *[_int(f).alias(f) for f in flags])
    bad = _bad(df, pl.lit(wrong), pl.col("id_i").is_null(), *[~pl.col(f).is_in([0, 1]) for f in flags])
    df = ctx.check(
        path, df, bad, "24 fields separated by '|': id|title|release date|video date|url|19 0/1 flags"
    )
    genres = pl.concat_list(
        [pl.when(pl.col(f) == 1).then(pl.lit(ML100K_GENRES[g])) for g, f in enumerate(flags)]
    ).list.drop_nulls()
    date_year = pl.col("f2").str.strip_chars().str.extract(r"(\d{4})$", 1).cast(pl.Int32, strict=False)
    title = pl.col("f1").str.strip_chars()
    items = df.select(
        pl.col("id_i").cast(pl.String).alias("raw_id"),
        pl.when(title == "").then(None).otherwise(title).alias("title"),
        genres.list.eval(pl.element().filter(~pl.element().is_in(NO_GENRE))).alias("genres"),
        pl.coalesce(date_year, _year_from_title(pl.col("f1"))).alias("year"),
    )
    genre_names = sorted(g for g in ML100K_GENRES if g not in NO_GENRE)

    path = _require(folder, "u.user")
    df, wrong = _split(read_lines(path, ctx, "latin-1"), "|", 5)
    df = df.with_columns(id_i=_int("f0"), age_i=_int("f1"))
    bad = _bad(df, pl.lit(wrong), pl.col("id_i").is_null(), pl.col("age_i").is_null())
    df = ctx.check(path, df, bad, "5 fields separated by '|': user id|age|gender|occupation|zip")
    occ = pl.col("f3").str.strip_chars()
    users = df.select(
        pl.col("id_i").cast(pl.String).alias("raw_id"),
        pl.col("f2").str.strip_chars().str.to_uppercase().alias("gender"),
        _age_group(pl.col("age_i")).alias("age"),
        pl.when(occ == "").then(None).otherwise(occ).alias("occupation"),
    )
    occupations = sorted(set(users["occupation"].drop_nulls().to_list()))
    return Parsed(inter, items, users, genre_names, occupations, bad_rows=ctx.bad_rows)


def _movies_dat(path: Path, ctx: _Ctx) -> pl.DataFrame:
    lines = read_lines(path, ctx, "latin-1")
    df = lines.with_columns(pl.col("line").str.extract_groups(r"^\s*(\d+)\s*::(.*)::([^:]*)$").alias("m"))
    df = df.unnest("m")
    df.columns = ["line_no", "line", "f0", "f1", "f2"]
    df = df.with_columns(id_i=_int("f0"))
    df = ctx.check(path, df, _bad(df, pl.col("id_i").is_null()), "MovieID::Title::Genres")
    title = pl.col("f1").str.strip_chars()
    return df.select(
        pl.col("id_i").cast(pl.String).alias("raw_id"),
        pl.when(title == "").then(None).otherwise(title).alias("title"),
        _genre_list(pl.col("f2")).alias("genres"),
        _year_from_title(pl.col("f1")).alias("year"),
    )


def parse_ml1m(folder: Path, ctx: _Ctx, *, with_users: bool = True) -> Parsed:
    inter = _ratings_file(_require(folder, "ratings.dat"), ctx, "::")
    items = _movies_dat(_require(folder, "movies.dat"), ctx)
    users = None
    occupations: list[str] = []
    if with_users:
        path = _require(folder, "users.dat")
        df, wrong = _split(read_lines(path, ctx, "latin-1"), "::", 5)
        df = df.with_columns(id_i=_int("f0"), age_i=_int("f2"), occ_i=_int("f3"))
        bad = _bad(df, pl.lit(wrong), pl.col("id_i").is_null(), pl.col("age_i").is_null(),
                   pl.col("occ_i").is_null())  # fmt: skip
        df = ctx.check(path, df, bad, "UserID::Gender::Age::Occupation::Zip-code with integer codes")
        occupations = list(ML1M_OCCUPATIONS)
        occ_map = {i: name for i, name in enumerate(ML1M_OCCUPATIONS)}
        users = df.select(
            pl.col("id_i").cast(pl.String).alias("raw_id"),
            pl.col("f1").str.strip_chars().str.to_uppercase().alias("gender"),
            pl.col("age_i").replace_strict(ML1M_AGE_CODES, default=0, return_dtype=pl.Int32).alias("age"),
            pl.col("occ_i").replace_strict(occ_map, default=None, return_dtype=pl.String).alias("occupation"),
        )
    return Parsed(inter, items, users, _genre_vocab(items), occupations, bad_rows=ctx.bad_rows)


def parse_ml10m(folder: Path, ctx: _Ctx) -> Parsed:
    return parse_ml1m(folder, ctx, with_users=False)


def parse_movielens_csv(folder: Path, ctx: _Ctx) -> Parsed:
    inter = _ratings_file(_require(folder, "ratings.csv"), ctx, ",", header="userId,movieId,rating,timestamp")
    path = _require(folder, "movies.csv")
    lines = _check_header(path, read_lines(path, ctx), "movieId,title,genres", ctx)
    df = lines.with_columns(
        pl.col("line").str.extract_groups(r'^\s*(\d+)\s*,("(?:[^"]|"")*"|[^",]*),(.*)$').alias("m")
    ).unnest("m")
    df.columns = ["line_no", "line", "f0", "f1", "f2"]
    df = df.with_columns(id_i=_int("f0"))
    df = ctx.check(
        path,
        df,
        _bad(df, pl.col("id_i").is_null()),
        'movieId,title,genres (title "quoted" if it has a comma)',
    )
    quoted = pl.col("f1").str.starts_with('"')
    title = (
        pl.when(quoted)
        .then(
            pl.col("f1")
            .str.slice(1, pl.col("f1").str.len_chars() - 2)
            .str.replace_all('""', '"', literal=True)
        )
        .otherwise(pl.col("f1"))
        .str.strip_chars()
    )
    items = df.select(
        pl.col("id_i").cast(pl.String).alias("raw_id"),
        title.alias("t"),
        _genre_list(pl.col("f2")).alias("genres"),
    ).select(
        "raw_id",
        pl.when(pl.col("t") == "").then(None).otherwise(pl.col("t")).alias("title"),
        "genres",
        _year_from_title(pl.col("t")).alias("year"),
    )
    return Parsed(inter, items, None, _genre_vocab(items), [], bad_rows=ctx.bad_rows)


def parse_lightgcn(folder: Path, ctx: _Ctx) -> Parsed:
    """train.txt / test.txt: `user item item ...` per line (whitespace separated, ids from 0)."""
    parts = []
    for part in ("train", "test"):
        path = _require(folder, f"{part}.txt")
        df = read_lines(path, ctx).with_columns(tok=pl.col("line").str.extract_all(r"\S+"))
        ints = df.select(pl.col("tok").list.eval(pl.element().cast(_INT, strict=False)).alias("ids"))["ids"]
        bad = ints.list.eval(pl.element().is_null() | (pl.element() < 0)).list.any()
        df = ctx.check(
            path, df.with_columns(ids=ints), bad, "whitespace-separated non-negative integers: user item ..."
        )
        long = (
            df.select(pl.col("ids").list.first().alias("user_i"), pl.col("ids").list.slice(1).alias("item_i"))
            .explode("item_i")
            .drop_nulls("item_i")
            .with_columns(part=pl.lit(part))
        )
        parts.append(long)
    both = pl.concat(parts)
    inter = _interactions(both, rating=False, timestamp=False).with_columns(both["part"])
    return Parsed(inter, None, None, [], [], has_timestamp=False, has_rating=False, bad_rows=ctx.bad_rows)


# ------------------------------------------------------------------------------------------- own files

_COLUMN_NAMES = {
    "user": ("user", "user_id", "userid", "uid"),
    "item": ("item", "item_id", "itemid", "iid"),
    "timestamp": ("timestamp", "time", "ts"),
    "rating": ("rating", "score"),
}


def _own_columns(path: Path, columns: list[str]) -> dict[str, str]:
    lower = {c.strip().lower(): c for c in columns}
    found = {}
    for key, names in _COLUMN_NAMES.items():
        for n in names:
            if n in lower:
                found[key] = lower[n]
                break
    missing = [k for k in ("user", "item") if k not in found]
    if missing:
        raise UserError(
            f"{path}: no {' or '.join(repr(m) for m in missing)} column (columns found: {', '.join(columns) or 'none'})",
            "Your own file needs columns user,item and optionally timestamp,rating.",
        )
    return found


def parse_own(path: Path, ctx: _Ctx, kind: str) -> Parsed:
    """A user's CSV (header row) or Parquet file with user,item[,timestamp][,rating] columns."""
    try:
        if kind == "own-parquet":
            raw = pl.read_parquet(path)
            line0 = -1  # rows, not lines: reported as "row N"
        else:
            sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
            raw = pl.read_csv(path, separator=sep, infer_schema=False, encoding="utf8-lossy")
            line0 = 2  # line 1 is the header
    except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
        raise UserError(
            f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    cols = _own_columns(path, raw.columns)
    has_ts, has_rating = "timestamp" in cols, "rating" in cols
    line_no = (
        pl.int_range(pl.len(), dtype=_INT) + line0 if line0 > 0 else -(pl.int_range(pl.len(), dtype=_INT) + 1)
    )

    def as_str(name: str) -> pl.Expr:
        c = pl.col(cols[name])
        dt = raw.schema[cols[name]]
        if dt == pl.String:
            return c.str.strip_chars()
        if dt.is_float():
            return pl.when(c == c.round()).then(c.cast(_INT, strict=False).cast(pl.String)).otherwise(None)
        return c.cast(pl.String, strict=False)

    def as_ts() -> pl.Expr:
        c = pl.col(cols["timestamp"])
        dt = raw.schema[cols["timestamp"]]
        if dt.is_temporal() and dt != pl.Duration and dt != pl.Time:
            return c.cast(pl.Datetime("us")).dt.epoch("s") if dt == pl.Date else c.dt.epoch("s")
        if dt.is_numeric():
            return c.cast(pl.Float64, strict=False).floor().cast(_INT, strict=False)
        s = c.cast(pl.String, strict=False).str.strip_chars()
        as_int = s.cast(_INT, strict=False)
        as_num = s.cast(pl.Float64, strict=False)
        as_num = (
            pl.when(as_num.is_finite() & (as_num.abs() < 9e18))
            .then(as_num.floor().cast(_INT))
            .otherwise(None)
        )
        return pl.coalesce(as_int, as_num)

    def as_rating() -> pl.Expr:
        c = pl.col(cols["rating"])
        dt = raw.schema[cols["rating"]]
        return (c.str.strip_chars() if dt == pl.String else c).cast(pl.Float64, strict=False)

    text_cols = [pl.col(c).cast(pl.String, strict=False).fill_null("") for c in raw.columns]
    df = raw.select(
        line_no.alias("line_no"),
        pl.concat_str(text_cols, separator=",").alias("line") if text_cols else pl.lit(""),
        as_str("user").alias("user_i"),
        as_str("item").alias("item_i"),
        (as_ts() if has_ts else pl.lit(0, _INT)).alias("ts_i"),
        (as_rating() if has_rating else pl.lit(None, pl.Float64)).alias("rating_f"),
    )
    conds = [
        pl.col("user_i").is_null() | (pl.col("user_i") == ""),
        pl.col("item_i").is_null() | (pl.col("item_i") == ""),
    ]
    if has_ts:
        conds.append(pl.col("ts_i").is_null())
    if has_rating:
        conds.append(_finite("rating_f"))
    expected = (
        "a user and an item id"
        + (", an integer timestamp" if has_ts else "")
        + (", a numeric rating" if has_rating else "")
    )
    df = ctx.check(path, df, _bad(df, *conds), expected)
    inter = _interactions(df, rating=has_rating, timestamp=has_ts)
    return Parsed(
        inter, None, None, [], [], has_timestamp=has_ts, has_rating=has_rating, bad_rows=ctx.bad_rows
    )


# ---------------------------------------------------------------------------------------------- entry

_PARSERS: dict[str, Callable[[Path, _Ctx], Parsed]] = {
    "ml-100k": parse_ml100k,
    "ml-1m": parse_ml1m,
    "ml-10m": parse_ml10m,
    "movielens-csv": parse_movielens_csv,
    "lightgcn": parse_lightgcn,
}


def own_format(path: Path) -> str:
    """The own-file format for a path by its suffix (Parquet: .parquet/.pq; everything else CSV)."""
    return "own-parquet" if path.suffix.lower() in (".parquet", ".pq") else "own-csv"


def parse(fmt: str, source: Path, *, skip_bad_rows: bool = False, file_name: str | None = None) -> Parsed:
    """Parse raw data. `source` is the raw folder (files named as in the registry) or, for own-csv /
    own-parquet, the folder holding `file_name` (or the file itself)."""
    ctx = _Ctx(skip_bad_rows)
    source = Path(source)
    try:
        if fmt in OWN_FORMATS:
            path = source / file_name if file_name else source
            if not path.is_file():
                raise UserError(f"file {path} not found")
            return parse_own(path, ctx, fmt)
        if fmt not in _PARSERS:
            raise UserError(f"unknown raw format {fmt!r}", f"Known formats: {', '.join(FORMATS)}.")
        return _PARSERS[fmt](source, ctx)
    except pl.exceptions.PolarsError as exc:  # a shape of bad input the checks above did not foresee
        raise UserError(f"cannot parse {source} as {fmt}: {str(exc).splitlines()[0]}", SKIP_HINT) from exc
