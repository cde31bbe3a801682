"""Queries: what every model reads about a user (the last L history items, most recent last, the user
features and the user id, which only a model with `user_id = true` reads). Built here for training (the
sampler), the warm start, the index (reached codes), evaluation and serving alike, so every layer reads the
same window of the same history."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sparcode_cli.data.dataset import Dataset, Ragged


@dataclass
class QueryBatch:
    history: Tensor  # (B, L) int64 item ids, left-padded with 0, most recent item last
    user_feats: Tensor  # (B, 3) int64: gender, age, occupation (0 = unknown)
    users: Tensor | None = None  # (B,) int64 dense user ids (0 = unknown), for a user-id embedding

    def to(self, device: torch.device | str) -> QueryBatch:
        users = None if self.users is None else self.users.to(device)
        return QueryBatch(self.history.to(device), self.user_feats.to(device), users)

    def __len__(self) -> int:
        return self.history.shape[0]


def last_items(ragged: Ragged, rows: np.ndarray, length: int) -> np.ndarray:
    """(n, length) int64: the last `length` values of each row, left-padded with 0 (most recent last)."""
    rows = np.asarray(rows, dtype=np.int64)
    start, end = ragged.indptr[rows], ragged.indptr[rows + 1]
    return window(ragged.values, start, end, length)


def window(values: np.ndarray, start: np.ndarray, end: np.ndarray, length: int) -> np.ndarray:
    """values[max(start, end - length):end] per row, left-padded with 0 to `length`."""
    idx = end[:, None] - length + np.arange(length, dtype=np.int64)[None, :]
    ok = idx >= start[:, None]
    if len(values) == 0:
        return np.zeros(idx.shape, dtype=np.int64)
    return np.where(ok, values[np.clip(idx, 0, len(values) - 1)], 0).astype(np.int64)


def query_batch(history: np.ndarray, user_feats: np.ndarray, users: np.ndarray | None = None) -> QueryBatch:
    return QueryBatch(
        torch.from_numpy(np.ascontiguousarray(history)),
        torch.from_numpy(np.ascontiguousarray(user_feats, dtype=np.int64)),
        None if users is None else torch.from_numpy(np.ascontiguousarray(users, dtype=np.int64)),
    )


def history_queries(
    ds: Dataset,
    history: Ragged,
    users: np.ndarray,
    max_history: int,
    rows: np.ndarray | None = None,
    batch: int = 4096,
) -> Iterator[QueryBatch]:
    """Queries of `users` in batches: user users[j] reads row rows[j] (default j) of `history`."""
    users = np.asarray(users, dtype=np.int64)
    rows = np.arange(len(users), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    feats = ds.features.user_feats
    for s in range(0, len(users), batch):
        sl = slice(s, s + batch)
        yield query_batch(last_items(history, rows[sl], max_history), feats[users[sl]], users[sl])


def training_users(ds: Dataset) -> np.ndarray:
    """Ids of the users with training items (train row index = user id)."""
    return np.flatnonzero(ds.train.lengths() > 0).astype(np.int64)


def training_queries(ds: Dataset, max_history: int, batch: int = 4096) -> Iterator[QueryBatch]:
    """Every training user's query as at test time: the last `max_history` training items."""
    users = training_users(ds)
    return history_queries(ds, ds.train, users, max_history, rows=users, batch=batch)
