"""Vectorised (numpy) training batches: queries, positives and the batch's shared negatives.

Ordered data: one training sample per position t >= 1 of each user's training sequence, query = the previous
L items (left-padded with 0, most recent last), positive = item t.
Unordered data (`ordered=False`): one sample per training interaction, positive = that item, query = up to L
of the user's *other* training items, a random subset drawn afresh each time.

Negatives are shared by the whole batch (S ids, model scores (B, S)):
  uniform   S = n_negatives ids drawn uniformly from 1..n_items (with replacement)
  in-batch  the batch's own positives (S = B)
  mixed     n_negatives // 2 uniform + the first n_negatives - n_negatives // 2 positives of the batch
`log_q` (S,) is the log of each negative's expected count in the batch under the proposal that drew the
negatives (the mixture, for `mixed`): the logQ correction subtracts it. For in-batch draws the proposal is the
empirical distribution of training positives (popularity). Accidental hits (a negative equal to a row's
positive) are masked by the trainer (`accidental_hits`).

Randomness: the epoch permutation comes from `default_rng([seed, epoch])` and each batch's draws from
`default_rng([seed, epoch, batch])`, so a run resumed at (epoch, batch) sees exactly the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sparcode_cli.data.dataset import Ragged
from sparcode_cli.data.queries import QueryBatch, query_batch, window

NEGATIVE_MODES = ("uniform", "in-batch", "mixed")


@dataclass
class Batch:
    query: QueryBatch
    pos: torch.Tensor  # (B,) int64
    neg: torch.Tensor  # (S,) int64
    log_q: torch.Tensor  # (S,) float32, log expected count of each negative (0 where no correction)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.query.to(device), self.pos.to(device), self.neg.to(device), self.log_q.to(device))


def accidental_hits(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """(B, S) bool: negative j equals row i's positive (to be masked to -inf)."""
    return neg.unsqueeze(0) == pos.unsqueeze(1)


class Sampler:
    """Epochs of shuffled batches over a dataset's training interactions."""

    def __init__(
        self,
        train: Ragged,
        user_feats: np.ndarray,
        n_items: int,
        *,
        ordered: bool,
        max_history: int,
        batch_size: int,
        negatives: str = "uniform",
        n_negatives: int = 256,
        logq: bool = True,
        seed: int = 0,
    ) -> None:
        if negatives not in NEGATIVE_MODES:
            raise ValueError(f"negatives must be one of {NEGATIVE_MODES}, got {negatives!r}")
        self.train, self.user_feats, self.n_items = train, user_feats, n_items
        self.ordered, self.L, self.batch_size = ordered, int(max_history), int(batch_size)
        self.negatives, self.n_negatives, self.logq, self.seed = negatives, int(n_negatives), logq, int(seed)
        lengths = train.lengths()
        row_of = np.repeat(np.arange(train.n_rows, dtype=np.int64), lengths)
        pos_in_row = np.arange(len(train.values), dtype=np.int64) - train.indptr[row_of]
        # ordered: position 0 has no history; unordered: a user needs one other item as the query
        keep = pos_in_row >= 1 if ordered else lengths[row_of] >= 2
        self.sample_pos = np.flatnonzero(keep).astype(np.int64)  # indices into train.values
        self.sample_row = row_of[self.sample_pos]
        if len(self.sample_pos) == 0:
            raise ValueError("no training samples: every user has fewer than 2 training interactions")
        counts = np.bincount(train.values[self.sample_pos], minlength=n_items + 1).astype(np.float64)
        self.pos_prob = counts / counts.sum()  # the in-batch proposal: frequency as a positive

    @property
    def n_samples(self) -> int:
        return len(self.sample_pos)

    def batches_per_epoch(self) -> int:
        return -(-self.n_samples // self.batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_samples)

    def batch(self, epoch: int, index: int, order: np.ndarray | None = None) -> Batch:
        """Batch `index` of `epoch` (pass `order = epoch_order(epoch)` to avoid recomputing it)."""
        if order is None:
            order = self.epoch_order(epoch)
        sel = order[index * self.batch_size : (index + 1) * self.batch_size]
        rng = np.random.default_rng([self.seed, epoch, index])
        p, rows = self.sample_pos[sel], self.sample_row[sel]
        pos = self.train.values[p]
        if self.ordered:
            hist = window(self.train.values, self.train.indptr[rows], p, self.L)
        else:
            hist = self._random_others(p, rows, rng)
        neg, log_q = self._negatives(pos, rng)
        q = query_batch(hist, self.user_feats[rows].astype(np.int64), rows)
        return Batch(q, torch.from_numpy(pos), torch.from_numpy(neg), torch.from_numpy(log_q))

    def _random_others(self, p: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Up to L random other training items of each sample's user (without replacement), left-padded."""
        start, end = self.train.indptr[rows], self.train.indptr[rows + 1]
        seg = end - start
        total = int(seg.sum())
        sample = np.repeat(np.arange(len(p), dtype=np.int64), seg)
        seg_start = np.repeat(np.cumsum(seg) - seg, seg)
        idx = np.arange(total, dtype=np.int64) - seg_start + np.repeat(start, seg)  # into train.values
        keys = rng.random(total)
        keys[idx == np.repeat(p, seg)] = 2.0  # the held-out positive sorts last: never in its own query
        order = np.argsort(sample + keys / 4.0, kind="stable")  # by sample, then random key
        rank = np.arange(total, dtype=np.int64) - seg_start
        m = np.minimum(seg - 1, self.L)
        take = rank < np.repeat(m, seg)
        s_idx, r_idx = sample[take], rank[take]
        out = np.zeros((len(p), self.L), dtype=np.int64)
        out[s_idx, self.L - np.repeat(m, seg)[take] + r_idx] = self.train.values[idx[order][take]]
        return out

    def _negatives(self, pos: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if self.negatives == "uniform":
            n_uni, inb = self.n_negatives, np.zeros(0, dtype=np.int64)
        elif self.negatives == "in-batch":
            n_uni, inb = 0, pos
        else:
            n_uni = self.n_negatives // 2
            inb = pos[: max(self.n_negatives - n_uni, 0)]
        uni = rng.integers(1, self.n_items + 1, size=n_uni, dtype=np.int64)
        neg = np.concatenate([uni, inb]).astype(np.int64)
        if not self.logq or len(neg) == 0:
            return neg, np.zeros(len(neg), dtype=np.float32)
        # expected count of each id in the batch's negatives under the (mixture) proposal
        expected = n_uni / self.n_items + len(inb) * self.pos_prob[neg]
        return neg, np.log(np.maximum(expected, 1e-12)).astype(np.float32)
