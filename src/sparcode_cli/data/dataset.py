"""The in-memory form of a preprocessed dataset: what every model, the trainer and the evaluator read.

On disk (written by `sparcode preprocess`, folder `<SPARCODE_HOME>/processed/<dataset>-<hash12>/`):

    meta.json       written last, so its presence means the folder is complete (see `Meta`)
    train.parquet   user:int32, item:int32, timestamp:int64   training interactions, rows in order
                    (per user chronological; for unordered data the file's order)
    valid.parquet   user:int32, item:int32, timestamp:int64, is_target:bool
    test.parquet    same. Per evaluated user, `is_target = false` rows are the query history in order
                    (what the encoder reads AND what is masked at ranking time), `true` rows the targets.
    items.parquet   item:int32 (1..n_items), raw_id:str, title:str (may be null),
                    genres:list[int32] (ids >= 1; empty list if none), year_bucket:int32 (0 = unknown)
    users.parquet   user:int32 (1..n_users), raw_id:str, gender:int32, age:int32, occupation:int32
                    (0 = unknown or absent)

Dense ids start at 1; id 0 is padding everywhere. Arrays indexed by item id have length n_items + 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True)
class Ragged:
    """Rows of variable length in CSR style: row r is values[indptr[r]:indptr[r+1]], order kept."""

    indptr: np.ndarray  # int64, (n_rows + 1,)
    values: np.ndarray  # int64

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    def row(self, r: int) -> np.ndarray:
        return self.values[self.indptr[r] : self.indptr[r + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def to_csr(self, n_cols: int) -> sp.csr_matrix:
        """Binary (n_rows, n_cols) matrix; a repeated value in a row counts once."""
        data = np.ones(len(self.values), dtype=np.float32)
        m = sp.csr_matrix((data, self.values.astype(np.int64), self.indptr), shape=(self.n_rows, n_cols))
        m.sum_duplicates()
        m.data[:] = 1.0
        return m

    @staticmethod
    def from_lists(rows: list[list[int]] | list[np.ndarray]) -> Ragged:
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        values = (
            np.concatenate([np.asarray(r, dtype=np.int64) for r in rows])
            if len(rows) and indptr[-1] > 0
            else np.zeros(0, dtype=np.int64)
        )
        return Ragged(indptr, values)


@dataclass(frozen=True)
class EvalSplit:
    """The users evaluated on one split: row r belongs to users[r]."""

    name: str  # "valid" or "test"
    users: np.ndarray  # int64 dense user ids, (U,)
    query: Ragged  # history in order: encoder input and the items masked at ranking time
    targets: Ragged  # items to retrieve (order kept)


@dataclass(frozen=True)
class Features:
    """Side features, as dense int arrays indexed by id (row 0 = padding, all zeros)."""

    item_genres: np.ndarray  # int64 (n_items + 1, max_genres), 0-padded genre ids
    item_year: np.ndarray  # int64 (n_items + 1,), year bucket, 0 = unknown
    user_feats: np.ndarray  # int64 (n_users + 1, 3): gender, age, occupation; 0 = unknown
    n_genres: int  # vocabulary size incl. 0 (embedding table size)
    n_year_buckets: int  # vocabulary size incl. 0
    user_vocab: tuple[int, int, int]  # vocabulary sizes incl. 0 for gender, age, occupation


@dataclass(frozen=True)
class Dataset:
    """A preprocessed dataset, loaded. `train` has one row per user id 0..n_users (row 0 empty)."""

    name: str
    data_hash: str
    n_users: int
    n_items: int
    ordered: bool  # False for unordered data (the `given` split): order-aware encoders refuse it
    train: Ragged  # per user id (row index = user id), training items in order
    valid: EvalSplit
    test: EvalSplit
    features: Features
    item_raw_ids: np.ndarray  # object/str array, (n_items + 1,), [0] = ""
    user_raw_ids: np.ndarray  # object/str array, (n_users + 1,), [0] = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> EvalSplit:
        if name not in ("valid", "test"):
            raise ValueError(f"unknown split {name!r}")
        return self.valid if name == "valid" else self.test

    def item_counts(self) -> np.ndarray:
        """Training interaction count per item id, (n_items + 1,)."""
        return np.bincount(self.train.values, minlength=self.n_items + 1).astype(np.int64)
