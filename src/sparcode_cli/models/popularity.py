"""Popularity: every user is served the items with the most training interactions (the floor).

Nothing is learned by gradient: `fit(ds)` stores the training counts; score(q, i) = count(i) for every query.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from sparcode_cli.data.dataset import Dataset
from sparcode_cli.models.base import DataContext, QueryBatch, Recommender


class Popularity(Recommender):
    name: ClassVar[str] = "popularity"
    trainable: ClassVar[bool] = False

    def __init__(self, cfg: dict[str, Any], ctx: DataContext) -> None:
        super().__init__(cfg, ctx)
        self.register_buffer("counts", torch.zeros(ctx.n_items + 1, dtype=torch.float32))

    def fit(self, ds: Dataset) -> None:
        counts = np.asarray(ds.item_counts(), dtype=np.float32)
        self.counts = torch.from_numpy(counts).to(self.counts.device)

    def score_all(self, q: QueryBatch) -> Tensor:
        scores = self.counts.unsqueeze(0).repeat(len(q), 1)
        scores[:, 0] = float("-inf")
        return scores

    def train_output(self, q: QueryBatch, pos: Tensor, neg: Tensor) -> Any:
        raise NotImplementedError("popularity is not trained by gradient: call fit(dataset)")
