"""The one small interface every model implements; the trainer, the index builder and the evaluator use it.

A query is a user's recent history (plus user features); a user-ID embedding is optional (`user_id = true`):
without it, unseen users work.
Item id 0 is padding everywhere: `score_all` returns (B, n_items + 1) with column 0 set to -inf.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from sparcode_cli.data.dataset import Dataset
from sparcode_cli.data.queries import QueryBatch  # noqa: F401  (re-exported: the models' query type)


@dataclass
class TrainOutput:
    """What a model returns for one training batch.

    pos_logits (B,) for each row's positive; neg_logits (B, S) against the batch's shared negatives.
    The trainer adds the logQ correction, masks accidental hits and takes the sampled softmax.
    aux_loss: model-specific terms already weighted (commitment, L1 sparsity), a scalar (0 if none).
    """

    pos_logits: Tensor
    neg_logits: Tensor
    aux_loss: Tensor


@dataclass(frozen=True)
class DataContext:
    """Dataset-derived sizes and feature tables a model is built with (saved inside every checkpoint)."""

    n_items: int
    n_genres: int
    n_year_buckets: int
    user_vocab: tuple[int, int, int]
    max_genres: int
    n_users: int = 0  # user ids 1..n_users (sizes the optional user-ID embedding)

    @staticmethod
    def from_dataset(ds: Dataset) -> DataContext:
        f = ds.features
        return DataContext(
            n_items=ds.n_items,
            n_genres=f.n_genres,
            n_year_buckets=f.n_year_buckets,
            user_vocab=tuple(int(v) for v in f.user_vocab),  # type: ignore[arg-type]
            max_genres=int(f.item_genres.shape[1]),
            n_users=ds.n_users,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_items": self.n_items,
            "n_genres": self.n_genres,
            "n_year_buckets": self.n_year_buckets,
            "user_vocab": list(self.user_vocab),
            "max_genres": self.max_genres,
            "n_users": self.n_users,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> DataContext:
        return DataContext(
            n_items=int(d["n_items"]),
            n_genres=int(d["n_genres"]),
            n_year_buckets=int(d["n_year_buckets"]),
            user_vocab=tuple(int(v) for v in d["user_vocab"]),  # type: ignore[arg-type]
            max_genres=int(d["max_genres"]),
            n_users=int(d.get("n_users", 0)),  # checkpoints from before the user-ID option
        )


class Recommender(nn.Module):
    """Base class. Subclasses set `name` and implement `train_output` and `score_all`."""

    name: ClassVar[str] = "base"
    trainable: ClassVar[bool] = True  # popularity sets False: the trainer only fits counts

    def __init__(self, cfg: dict[str, Any], ctx: DataContext) -> None:
        super().__init__()
        self.cfg = dict(cfg)
        self.ctx = ctx

    # -- training -------------------------------------------------------------------------------------
    def train_output(self, q: QueryBatch, pos: Tensor, neg: Tensor) -> TrainOutput:
        """Logits for the positives (B,) and the shared negatives (S,) of one batch."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after each optimiser step (schedules, e.g. SparCode's density target)."""

    def selectable(self) -> bool:
        """Whether a validation result now may select the best checkpoint (SparCode: not during the density
        warm-up, whose denser index would win by being dense)."""
        return True

    def epoch_stats(self) -> dict[str, Any]:
        """Numbers to log once per epoch (SparCode: codes in use, perplexity, restarts, density)."""
        return {}

    # -- scoring --------------------------------------------------------------------------------------
    def score_all(self, q: QueryBatch) -> Tensor:
        """Exact scores of every item for each query: (B, n_items + 1), column 0 = -inf."""
        raise NotImplementedError


def mask_padding_column(scores: Tensor) -> Tensor:
    scores[:, 0] = float("-inf")
    return scores
