"""Two-tower (DSSM / YouTubeDNN): score(q, i) = <E_q(q), E_i(i)> / τ, with E normalised for `cosine`.

Config keys (besides the shared encoder keys of encoders.py): `similarity` ("cosine" or "dot"),
`temperature` (τ). For the Faiss index: `encode_queries(q)` returns query vectors with 1/τ folded in and
`item_embeddings()` the item vectors (normalised for cosine), so the inner product is exactly the model's score.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from sparcode_cli.models.base import DataContext, QueryBatch, Recommender, TrainOutput
from sparcode_cli.models.encoders import ItemEncoder, build_query_encoder


class TwoTower(Recommender):
    name: ClassVar[str] = "two-tower"

    def __init__(self, cfg: dict[str, Any], ctx: DataContext) -> None:
        super().__init__(cfg, ctx)
        self.query_encoder = build_query_encoder(cfg, ctx)
        self.item_encoder = ItemEncoder(cfg, ctx)
        self.cosine = str(cfg.get("similarity", "cosine")) == "cosine"
        self.temperature = float(cfg.get("temperature", 0.1 if self.cosine else 1.0))
        self._item_cache: Tensor | None = None

    # -- the two towers ------------------------------------------------------------------------------
    def _q(self, q: QueryBatch) -> Tensor:
        v = self.query_encoder(q)
        return F.normalize(v, dim=-1) if self.cosine else v

    def _i(self, items: Tensor) -> Tensor:
        v = self.item_encoder(items)
        return F.normalize(v, dim=-1) if self.cosine else v

    # -- training ------------------------------------------------------------------------------------
    def train_output(self, q: QueryBatch, pos: Tensor, neg: Tensor) -> TrainOutput:
        qv = self._q(q)  # (B, d)
        # every distinct item of the batch (positives + shared negatives) is encoded once
        uniq, inv = torch.unique(torch.cat([pos, neg]), return_inverse=True)
        iv = self._i(uniq)[inv]
        b = pos.shape[0]
        pos_logits = (qv * iv[:b]).sum(-1) / self.temperature
        neg_logits = qv @ iv[b:].T / self.temperature
        return TrainOutput(pos_logits, neg_logits, qv.new_zeros(()))

    def train(self, mode: bool = True) -> TwoTower:
        self._item_cache = None  # weights may change: the cached item side is stale
        return super().train(mode)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self._item_cache = None
        return super().load_state_dict(*args, **kwargs)

    # -- scoring -------------------------------------------------------------------------------------
    @torch.no_grad()
    def item_embeddings(self, chunk: int = 65536) -> Tensor:
        """(n_items + 1, d) item vectors (normalised for cosine); row 0 (padding) is zero."""
        dev = next(self.parameters()).device
        ids = torch.arange(self.ctx.n_items + 1, device=dev)
        out = torch.cat([self._i(ids[s : s + chunk]) for s in range(0, len(ids), chunk)])
        out[0] = 0.0
        return out

    def encode_queries(self, q: QueryBatch) -> Tensor:
        """(B, d) query vectors with 1/τ folded in: <encode_queries(q), item_embeddings()[i]> = score."""
        return self._q(q) / self.temperature

    def score_all(self, q: QueryBatch) -> Tensor:
        if self.training or torch.is_grad_enabled():
            items = self.item_embeddings()
        else:  # eval + no grad: encode all items once and reuse until train() / load_state_dict()
            dev = next(self.parameters()).device
            if self._item_cache is None or self._item_cache.device != dev:
                self._item_cache = self.item_embeddings()
            items = self._item_cache
        scores = self.encode_queries(q) @ items.T
        scores[:, 0] = float("-inf")
        return scores
