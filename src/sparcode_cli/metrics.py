"""Ranking metrics by full ranking over all items (DESIGN §4).

Recall@K = hits / |targets|; Precision@K = hits / K; HitRate@K = 1 if any hit; NDCG@K = DCG over binary
relevance / IDCG over min(|targets|, K) positions. Averaged over the users that have targets.

Every query item of a user (its whole history before the evaluated period, not only the last L items the
encoder reads) is masked before ranking. Ties break by (score descending, item id ascending); masked items
(-inf) are never returned; with `exclude_nonpositive` (SparCode) a score <= 0 means "not retrieved", so a
list may be shorter than K: `list_len@K` reports the mean length.

    res = evaluate(model, ds, "valid")                 # batched: users x items never all in memory
    res.summary["recall@20"], res.per_user["recall@20"]  # per-user arrays feed the paired bootstrap
    res = metrics_from_topk(topk_items, targets)         # the same numbers from saved top-k lists
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sparcode_cli import distributed as dd
from sparcode_cli.data.dataset import Dataset, Ragged
from sparcode_cli.data.queries import last_items, query_batch

DEFAULT_KS = (20, 50)
METRICS = ("recall", "ndcg", "precision", "hitrate", "list_len")


@dataclass
class EvalResult:
    summary: dict[str, float]  # "recall@20", ..., "n_users"
    per_user: dict[str, np.ndarray]  # each (U,), NaN for a user without targets
    users: np.ndarray  # (U,) user ids (row order of per_user / topk)
    topk: np.ndarray  # (U, max K) item ids, 0 = no item (a shorter list)
    lengths: np.ndarray  # (U,) list lengths (<= max K)


def topk(scores: Tensor, k: int, *, exclude_nonpositive: bool = False) -> tuple[Tensor, Tensor]:
    """Top-k item ids per row with deterministic ties: (score descending, item id ascending).

    Returns items (B, k) int64, padded with 0 where a row has fewer than k retrievable items, and lengths (B,).
    Items scored -inf are never returned; with `exclude_nonpositive`, neither is any score <= 0.
    `scores` is not modified.
    """
    b, n = scores.shape
    k = int(k)
    if k <= 0 or b == 0:
        return torch.zeros(b, max(k, 0), dtype=torch.long), torch.zeros(b, dtype=torch.long)
    floor = 0.0 if exclude_nonpositive else float("-inf")
    valid = scores > floor
    ke = min(k, n)
    kth = torch.topk(scores, ke, dim=1, sorted=True).values[:, -1:]  # (B, 1) k-th largest value
    # Strictly above the k-th value: always in. Equal to it: the smallest ids fill the remaining slots.
    above = (scores > kth) & valid
    n_above = above.sum(1)
    need = ke - n_above
    r_a, c_a = above.nonzero(as_tuple=True)  # row-major: ids ascending within a row
    r_e, c_e = ((scores == kth) & valid).nonzero(as_tuple=True)
    rank_a = _rank_in_row(r_a, b)
    rank_e = _rank_in_row(r_e, b)
    keep = rank_e < need[r_e]
    r_e, c_e, rank_e = r_e[keep], c_e[keep], rank_e[keep]
    items = torch.zeros(b, k, dtype=torch.long, device=scores.device)
    vals = torch.full((b, k), float("-inf"), dtype=scores.dtype, device=scores.device)
    items[r_a, rank_a] = c_a
    items[r_e, n_above[r_e] + rank_e] = c_e
    vals[r_a, rank_a] = scores[r_a, c_a]
    vals[r_e, n_above[r_e] + rank_e] = scores[r_e, c_e]
    # ids are ascending within equal scores, so a stable sort by score keeps (score desc, id asc)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    items = torch.gather(items, 1, order)
    lengths = n_above + torch.minimum(need, torch.bincount(r_e, minlength=b))
    return items.cpu(), lengths.cpu()


def _rank_in_row(rows: Tensor, n_rows: int) -> Tensor:
    """For row-major sorted `rows`, the position of each entry within its row."""
    counts = torch.bincount(rows, minlength=n_rows)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(len(rows), device=rows.device) - starts[rows]


def metrics_from_topk(
    topk_items: np.ndarray,
    targets: Ragged,
    ks: tuple[int, ...] = DEFAULT_KS,
    *,
    users: np.ndarray | None = None,
    lengths: np.ndarray | None = None,
) -> EvalResult:
    """Metrics from given top-k lists (U, >= max K; 0 = no item) and targets (U rows)."""
    items = np.asarray(topk_items, dtype=np.int64)
    if items.ndim != 2 or items.shape[0] != targets.n_rows:
        raise ValueError(f"top-k lists {items.shape} do not match {targets.n_rows} target rows")
    u = items.shape[0]
    kmax = max(ks)
    if items.shape[1] < kmax:
        items = np.pad(items, ((0, 0), (0, kmax - items.shape[1])))
    if lengths is None:
        lengths = (items > 0).sum(1)
    m = int(max(items.max(initial=0), targets.values.max(initial=0))) + 1
    t_rows = np.repeat(np.arange(u, dtype=np.int64), targets.lengths())
    t_keys = np.unique(t_rows * m + targets.values)
    n_targets = np.bincount(t_keys // m, minlength=u)
    keys = np.arange(u, dtype=np.int64)[:, None] * m + items[:, :kmax]
    hit = np.isin(keys, t_keys) & (items[:, :kmax] > 0)
    disc = 1.0 / np.log2(np.arange(kmax) + 2.0)
    idcg_cum = np.cumsum(disc)
    has = n_targets > 0
    safe_nt = np.maximum(n_targets, 1)
    per_user: dict[str, np.ndarray] = {}
    for k in ks:
        h = hit[:, :k]
        nh = h.sum(1).astype(np.float64)
        idcg = idcg_cum[np.minimum(safe_nt, k) - 1]
        vals = {
            "recall": nh / safe_nt,
            "ndcg": (h * disc[:k]).sum(1) / idcg,
            "precision": nh / k,
            "hitrate": (nh > 0).astype(np.float64),
            "list_len": np.minimum(lengths, k).astype(np.float64),
        }
        for name in METRICS:
            per_user[f"{name}@{k}"] = np.where(has, vals[name], np.nan)
    summary = {key: float(np.nanmean(v)) if has.any() else 0.0 for key, v in per_user.items()}
    summary["n_users"] = int(has.sum())
    if users is None:
        users = np.arange(u, dtype=np.int64)
    return EvalResult(summary, per_user, np.asarray(users), items[:, :kmax], np.asarray(lengths))


def evaluate(
    model: torch.nn.Module,
    ds: Dataset,
    split: str = "valid",
    ks: tuple[int, ...] = DEFAULT_KS,
    *,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    exclude_nonpositive: bool | None = None,
    max_history: int | None = None,
) -> EvalResult:
    """Exact full ranking of every item for each user of `split`, query items masked, batched over users.

    `model.score_all(QueryBatch) -> (B, n_items + 1)`; the query is the last `max_history` (default: the
    model config's `max_history`) items of the split's query history; all query items are masked (written
    into the returned tensor, so `score_all` must return a fresh tensor, not a cached one).
    Under torchrun every rank ranks every world_size-th batch (the same batches as one process) and the top-k
    lists are gathered, so every rank returns the one-process result.
    """
    es = ds.split(split)
    if exclude_nonpositive is None:
        exclude_nonpositive = bool(getattr(model, "exclude_nonpositive", False))
    if max_history is None:
        max_history = int(getattr(model, "cfg", {}).get("max_history", 50))
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    kmax = max(ks)
    n = len(es.users)
    all_items = np.zeros((n, kmax), dtype=np.int64)
    all_len = np.zeros(n, dtype=np.int64)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for s in range(0, n, batch_size)[dd.rank() :: dd.world_size()]:
                rows = np.arange(s, min(s + batch_size, n), dtype=np.int64)
                users = es.users[rows]
                hist = last_items(es.query, rows, max_history)
                q = query_batch(hist, ds.features.user_feats[users].astype(np.int64), users).to(device)
                scores = model.score_all(q)
                if not scores.is_contiguous():  # e.g. an expanded view: the masking below writes into it
                    scores = scores.contiguous()
                qlen = es.query.lengths()[rows]
                r = torch.from_numpy(np.repeat(np.arange(len(rows), dtype=np.int64), qlen)).to(scores.device)
                c = torch.from_numpy(es.query.values[es.query.indptr[s] : es.query.indptr[rows[-1] + 1]])
                scores.index_put_((r, c.to(scores.device)), torch.tensor(float("-inf"), device=scores.device))
                scores[:, 0] = float("-inf")
                items, lengths = topk(scores, kmax, exclude_nonpositive=exclude_nonpositive)
                all_items[rows] = items.numpy()
                all_len[rows] = lengths.numpy()
    finally:
        model.train(was_training)
    if dd.is_distributed():
        mine = np.concatenate(
            [
                np.arange(s, min(s + batch_size, n))
                for s in range(0, n, batch_size)[dd.rank() :: dd.world_size()]
            ]
            + [np.zeros(0, dtype=np.int64)]
        ).astype(np.int64)
        for rows, items_, lens_ in dd.all_gather_object((mine, all_items[mine], all_len[mine])):
            all_items[rows], all_len[rows] = items_, lens_
    return metrics_from_topk(all_items, es.targets, ks, users=es.users, lengths=all_len)


def format_summary(summary: dict[str, float], keys: tuple[str, ...] = ("recall@20", "ndcg@20")) -> str:
    return " ".join(f"{k}={summary[k]:.4f}" for k in keys if k in summary)
