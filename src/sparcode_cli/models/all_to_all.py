"""All-to-all: SparCode without the quantizer and without the ReLU cut, the ceiling (DESIGN §2 table).

    score(u, i) = sum_k g(z_k, t(i))      z_k the unquantized user tokens, g shared with SparCode

The towers, token heads and g live in models/interaction.py (`TokenCross`). Retrieval is brute force:
`score_all` scores every item with batched `table` calls over chunks of tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sparcode_cli.models.base import QueryBatch, TrainOutput
from sparcode_cli.models.interaction import TokenCross


class AllToAll(TokenCross):
    name = "all-to-all"

    def train_output(self, q: QueryBatch, pos: Tensor, neg: Tensor) -> TrainOutput:
        b_size = len(pos)
        z = self.user_tokens(q).reshape(-1, self.token_dim)  # (B*K_u, D)
        c = self.interaction.code_side(z)
        it = self.interaction.item_side(self.tokens_of(torch.cat([pos, neg])))
        neg_logits = self.interaction.table(c, it[b_size:]).reshape(b_size, self.k_u, -1).sum(1)
        pos_logits = self.interaction.paired(c.rows(b_size, self.k_u), it[:b_size]).sum(1)
        return TrainOutput(pos_logits, neg_logits, pos_logits.new_zeros(()))

    @torch.no_grad()
    def score_all(self, q: QueryBatch) -> Tensor:
        """Brute force over every item: (B, n_items + 1), column 0 = -inf."""
        z = self.user_tokens(q).reshape(-1, self.token_dim)
        _, side = self._all_items()
        out = self.interaction.table_chunked(z, side).reshape(len(q), self.k_u, -1).sum(1)
        out[:, 0] = float("-inf")
        return out

    def init_from_run(self, ckpt: dict[str, Any], queries: QueryBatch | None = None) -> None:
        """Warm start from a trained two-tower checkpoint, as SparCode's (`TokenCross._copy_two_tower`), so
        the ceiling gets the same head start and budget."""
        self._copy_two_tower(ckpt)
