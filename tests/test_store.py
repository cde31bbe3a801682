"""Loading a preprocessed folder into the Dataset dataclasses, and refusing incomplete or damaged folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from sparcode_cli.data.preprocess import PreprocessParams, preprocess_raw
from sparcode_cli.data.registry import get_spec
from sparcode_cli.data.store import load_dataset
from sparcode_cli.errors import UserError
from tests.fixtures import grid_rows, raw_of, write_ml100k


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rows = grid_rows(9, 12, drop=[(1, 12), (2, 11), (2, 12)])
    return preprocess_raw(
        raw_of(write_ml100k(tmp_path / "raw", rows)), get_spec("ml-100k"), PreprocessParams()
    )


def test_load_matches_parquet(folder: Path) -> None:
    ds = load_dataset(folder)
    train = pl.read_parquet(folder / "train.parquet")
    assert ds.n_users == 9 and ds.n_items == 12 and ds.train.n_rows == 10 and ds.ordered
    for u in range(1, 10):
        assert ds.train.row(u).tolist() == train.filter(pl.col("user") == u)["item"].to_list()
    assert ds.train.row(0).size == 0 and ds.train.indptr.dtype == np.int64
    for name in ("valid", "test"):
        split, df = ds.split(name), pl.read_parquet(folder / f"{name}.parquet")
        assert split.name == name and split.users.tolist() == sorted(set(df["user"]))
        for r, u in enumerate(split.users):
            g = df.filter(pl.col("user") == int(u))
            assert split.query.row(r).tolist() == g.filter(~pl.col("is_target"))["item"].to_list()
            assert split.targets.row(r).tolist() == g.filter(pl.col("is_target"))["item"].to_list()
    # user 2 has 10 items: 8 train, 1 valid, 1 test; the test query is train + valid in order
    r = ds.test.users.tolist().index(2)
    assert ds.test.query.row(r).tolist() == ds.train.row(2).tolist() + ds.valid.targets.row(r).tolist()
    assert ds.test.targets.lengths().tolist() == [1] * 9


def test_features_arrays(folder: Path) -> None:
    ds = load_dataset(folder)
    f = ds.features
    items = pl.read_parquet(folder / "items.parquet")
    assert f.item_genres.shape == (13, int(items["genres"].list.len().max()))
    assert f.item_genres[0].tolist() == [0] * f.item_genres.shape[1] and f.item_year[0] == 0
    for row in items.iter_rows(named=True):
        g = f.item_genres[row["item"]]
        assert g[g > 0].tolist() == row["genres"] and f.item_year[row["item"]] == row["year_bucket"]
    assert f.user_feats.shape == (10, 3) and f.user_feats[0].tolist() == [0, 0, 0]
    assert f.user_feats[1].tolist() == [2, 1, 3]  # F, <18, student
    assert f.n_genres == 19 and f.user_vocab == (3, 8, 5)
    assert f.n_year_buckets == int(f.item_year.max()) + 1
    assert ds.item_raw_ids[0] == "" and ds.item_raw_ids[12] == "12" and ds.user_raw_ids[9] == "9"
    assert ds.item_counts().shape == (13,) and ds.item_counts()[0] == 0


def test_missing_meta(folder: Path) -> None:
    (folder / "meta.json").unlink()
    with pytest.raises(UserError, match="no meta.json") as err:
        load_dataset(folder)
    assert "sparcode preprocess" in str(err.value)


@pytest.mark.parametrize("name", ["train", "valid", "test", "items", "users"])
def test_missing_or_corrupt_parquet(folder: Path, name: str) -> None:
    path = folder / f"{name}.parquet"
    path.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(UserError, match=f"{name}.parquet is not a readable Parquet file") as err:
        load_dataset(folder)
    assert "sparcode preprocess" in str(err.value)
    path.unlink()
    with pytest.raises(UserError, match=f"{name}.parquet is missing"):
        load_dataset(folder)


def test_wrong_columns(folder: Path) -> None:
    pl.DataFrame({"user": [1]}).write_parquet(folder / "train.parquet")
    with pytest.raises(UserError, match="lacks the column"):
        load_dataset(folder)


def test_group_unsorted_keys_keep_order() -> None:
    from sparcode_cli.data.store import _group

    keys = np.array([3, 1, 3, 1, 2])
    r = _group(keys, np.array([10, 11, 12, 13, 14]), np.array([1, 3]), n_keys=3)
    assert r.row(0).tolist() == [11, 13] and r.row(1).tolist() == [10, 12] and r.n_rows == 2
