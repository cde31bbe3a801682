"""Tiny in-memory datasets where the right answer is known (the `implicit` library's "checkerboard" idea).

Both builders return a complete `Dataset` (data/dataset.py): `train` indexed by user id with row 0 empty,
`valid`/`test` EvalSplits in the time-split layout (valid query = training history; test query = training +
validation history), zero/unknown feature tables, raw ids as strings and a data hash. Item and user ids are
shuffled, so a group is never a contiguous id range (tie-breaking by id cannot fake a good score).

The ground truth travels in `ds.meta`: `user_group` (n_users + 1,), `item_group` (n_items + 1,) (index 0 = -1)
and, for `group_table`, `table` (the G x G relevance table).

    ds = checkerboard()                 # 4 user groups x 4 item groups, diagonal relevance
    ds = group_table(n_groups=32)       # random 32 x 32 relevance table
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from sparcode_cli.data.dataset import Dataset, EvalSplit, Features, Ragged


def _build(
    name: str,
    item_lists: list[np.ndarray],
    user_group: np.ndarray,
    item_group: np.ndarray,
    seq_len: int,
    n_targets: int,
    ordered: bool,
    meta: dict,
) -> Dataset:
    """Users 1..n_users (row u-1 of item_lists): first seq_len items train, next n_targets valid, rest test."""
    n_users = len(item_lists)
    n_items = len(item_group) - 1
    train_rows: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    v_query, v_targets, t_query, t_targets = [], [], [], []
    for items in item_lists:
        tr = items[:seq_len]
        va = items[seq_len : seq_len + n_targets]
        te = items[seq_len + n_targets : seq_len + 2 * n_targets]
        train_rows.append(tr)
        v_query.append(tr)
        v_targets.append(va)
        t_query.append(np.concatenate([tr, va]))
        t_targets.append(te)
    users = np.arange(1, n_users + 1, dtype=np.int64)
    valid = EvalSplit("valid", users.copy(), Ragged.from_lists(v_query), Ragged.from_lists(v_targets))
    test = EvalSplit("test", users.copy(), Ragged.from_lists(t_query), Ragged.from_lists(t_targets))
    features = Features(
        item_genres=np.zeros((n_items + 1, 1), dtype=np.int64),
        item_year=np.zeros(n_items + 1, dtype=np.int64),
        user_feats=np.zeros((n_users + 1, 3), dtype=np.int64),
        n_genres=1,
        n_year_buckets=1,
        user_vocab=(1, 1, 1),
    )
    train = Ragged.from_lists(train_rows)
    h = hashlib.sha256()
    for arr in (train.indptr, train.values, valid.targets.values, test.targets.values):
        h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
    h.update(f"{name}|{ordered}".encode())
    item_raw = np.array([""] + [f"i{i}" for i in range(1, n_items + 1)], dtype=object)
    user_raw = np.array([""] + [f"u{u}" for u in range(1, n_users + 1)], dtype=object)
    meta = dict(meta)
    meta.update(user_group=user_group, item_group=item_group, synthetic=True)
    return Dataset(
        name=name,
        data_hash=h.hexdigest()[:12],
        n_users=n_users,
        n_items=n_items,
        ordered=ordered,
        train=train,
        valid=valid,
        test=test,
        features=features,
        item_raw_ids=item_raw,
        user_raw_ids=user_raw,
        meta=meta,
    )


def _groups(n_groups: int, per_group: int, rng: np.random.Generator) -> np.ndarray:
    """group of each id 1..n (index 0 = -1), ids shuffled so a group is not a contiguous id range."""
    g = np.repeat(np.arange(n_groups, dtype=np.int64), per_group)
    rng.shuffle(g)
    return np.concatenate([[-1], g]).astype(np.int64)


def checkerboard(
    n_user_groups: int = 4,
    n_item_groups: int = 4,
    users_per_group: int = 32,
    items_per_group: int = 25,
    seq_len: int = 10,
    n_targets: int = 2,
    seed: int = 0,
    ordered: bool = True,
) -> Dataset:
    """Users of group g interact only with items of group g % n_item_groups, in random order.

    Each user draws seq_len + 2 * n_targets distinct items of its group: the first seq_len are the training
    sequence, the next n_targets the validation targets, the last n_targets the test targets.
    A perfect model ranks the (unseen) items of the user's group first; chance is about K / n_items.
    """
    need = seq_len + 2 * n_targets
    if items_per_group < need:
        raise ValueError(f"items_per_group ({items_per_group}) must be >= seq_len + 2*n_targets ({need})")
    rng = np.random.default_rng(seed)
    user_group = _groups(n_user_groups, users_per_group, rng)
    item_group = _groups(n_item_groups, items_per_group, rng)
    by_group = [np.flatnonzero(item_group == g) for g in range(n_item_groups)]
    lists = [
        rng.permutation(by_group[int(user_group[u]) % n_item_groups])[:need]
        for u in range(1, len(user_group))
    ]
    return _build(
        "checkerboard",
        lists,
        user_group,
        item_group,
        seq_len,
        n_targets,
        ordered,
        {"n_user_groups": n_user_groups, "n_item_groups": n_item_groups},
    )


def group_table(
    n_groups: int = 32,
    table: np.ndarray | None = None,
    users_per_group: int = 16,
    items_per_group: int = 8,
    seq_len: int = 12,
    n_targets: int = 3,
    density: float = 0.15,
    seed: int = 0,
    ordered: bool = True,
) -> Dataset:
    """Relevance is a G x G table of user groups x item groups: a user of group a interacts with items of the
    groups b where table[a, b] (drawn uniformly from their union, random order, no repeats).

    `table` defaults to a random boolean table of the given density with at least
    ceil((seq_len + 2 * n_targets) / items_per_group) True entries per row, so every user has enough items.
    """
    rng = np.random.default_rng(seed)
    need = seq_len + 2 * n_targets
    min_per_row = -(-need // items_per_group)
    if table is None:
        table = rng.random((n_groups, n_groups)) < density
        for a in range(n_groups):
            short = min_per_row - int(table[a].sum())
            if short > 0:
                table[a, rng.choice(np.flatnonzero(~table[a]), size=short, replace=False)] = True
    table = np.asarray(table, dtype=bool)
    if table.shape != (n_groups, n_groups):
        raise ValueError(f"table must be {n_groups}x{n_groups}, got {table.shape}")
    if (table.sum(1) * items_per_group < need).any():
        raise ValueError("some table row allows fewer items than seq_len + 2*n_targets")
    user_group = _groups(n_groups, users_per_group, rng)
    item_group = _groups(n_groups, items_per_group, rng)
    allowed = [
        np.flatnonzero(table[a][np.maximum(item_group, 0)] & (item_group >= 0)) for a in range(n_groups)
    ]
    lists = [rng.permutation(allowed[int(user_group[u])])[:need] for u in range(1, len(user_group))]
    return _build(
        "group-table",
        lists,
        user_group,
        item_group,
        seq_len,
        n_targets,
        ordered,
        {"n_groups": n_groups, "table": table},
    )


def relevant_items(ds: Dataset, user: int) -> np.ndarray:
    """All item ids relevant to a user under the ground truth (its group's items)."""
    ug = int(ds.meta["user_group"][user])
    ig = ds.meta["item_group"]
    if "table" in ds.meta:
        return np.flatnonzero((ig >= 0) & ds.meta["table"][ug][np.maximum(ig, 0)])
    return np.flatnonzero(ig == ug % int(ds.meta["n_item_groups"]))


def write_csv(ds: Dataset, path: Path, *, timestamps: bool = True) -> Path:
    """The dataset as user,item[,timestamp] rows (train, then valid and test targets, in order); without
    timestamps the CSV is unordered data."""
    lines = ["user,item,timestamp" if timestamps else "user,item"]
    for u in range(1, ds.n_users + 1):
        seq = np.concatenate([ds.train.row(u), ds.valid.targets.row(u - 1), ds.test.targets.row(u - 1)])
        lines += [f"u{u},i{i},{t}" if timestamps else f"u{u},i{i}" for t, i in enumerate(seq.tolist())]
    path.write_text("\n".join(lines) + "\n")
    return path
