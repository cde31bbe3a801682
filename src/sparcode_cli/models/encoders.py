"""Shared encoders: the item encoder (id + genres + year) and the query encoders (`dnn`, `sasrec`, `gru4rec`).

Config keys read here (all under the model config): `dim` (output size d), `emb_dim` (embedding size),
`hidden` (MLP hidden size; 0: one linear layer), `dropout`, `query_encoder` ("dnn", "sasrec" or "gru4rec"),
`sasrec_layers`, `sasrec_heads`, `gru_layers`, `max_history` (L), `user_id` (a user-ID embedding in every query
encoder), `tower` ("mlp" or "embedding"), `history` (false: the dnn query leaves the history out).

`tower` = "mlp" (the default): each tower concatenates its parts (history summary, user features; item id, genres,
year) and maps them with `mlp` to R^d. `tower` = "embedding": no map at all; each tower is the sum of its parts'
embeddings (every part emb_dim wide, so dim must equal emb_dim): the query is the history summary + the user-ID
embedding + the user-feature embeddings, the item its id embedding + mean genre embedding + year embedding (on a
dataset without item features, the id embedding alone). `hidden` then shapes nothing, and `dropout` acts only
inside the sasrec and gru4rec encoders.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sparcode_cli.models.base import DataContext, QueryBatch

TOWERS = ("mlp", "embedding")


def mlp(sizes: list[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear layers with GELU and dropout between them (none after the last). A hidden size of 0 drops that
    layer: `hidden = 0` makes a tower one linear map (YouTubeDNN with no hidden layer, MF-like).

    The Dropout module is there even at p = 0, so parameter names do not depend on the dropout setting and a
    checkpoint trained with dropout can warm-start a model without it (and back)."""
    sizes = [sizes[0], *(h for h in sizes[1:-1] if h > 0), sizes[-1]]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.extend([nn.GELU(), nn.Dropout(dropout)])
    return nn.Sequential(*layers)


def embedding_tower(cfg: dict[str, Any]) -> bool:
    """Whether the towers are the identity on their summed embeddings (`tower = "embedding"`), not an MLP."""
    tower = str(cfg.get("tower", "mlp"))
    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
    return tower == "embedding"


def tower_map(cfg: dict[str, Any], in_dim: int) -> nn.Sequential | None:
    """A tower's map from its concatenated parts (`in_dim` wide) to R^dim: the MLP of `hidden` / `dropout`, or
    None for `tower = "embedding"` (the parts are summed instead; see `combine`)."""
    if embedding_tower(cfg):
        return None
    return mlp([in_dim, int(cfg["hidden"]), int(cfg["dim"])], float(cfg.get("dropout", 0.0)))


def combine(parts: list[Tensor], tower: nn.Module | None) -> Tensor:
    """A tower's output: its map of the concatenated parts, or (no map) the sum of the parts."""
    if tower is None:
        return torch.stack(parts).sum(0)
    return tower(torch.cat(parts, dim=-1))


class ItemEncoder(nn.Module):
    """Item id embedding + mean of genre embeddings + year-bucket embedding -> MLP -> R^d (`tower = "embedding"`:
    their sum, no MLP)."""

    def __init__(self, cfg: dict[str, Any], ctx: DataContext) -> None:
        super().__init__()
        e, d = int(cfg["emb_dim"]), int(cfg["dim"])
        self.id_emb = nn.Embedding(ctx.n_items + 1, e, padding_idx=0)
        self.genre_emb = nn.Embedding(max(ctx.n_genres, 1), e, padding_idx=0)
        self.year_emb = nn.Embedding(max(ctx.n_year_buckets, 1), e, padding_idx=0)
        self.register_buffer(
            "item_genres", torch.zeros(ctx.n_items + 1, max(ctx.max_genres, 1), dtype=torch.long)
        )
        self.register_buffer("item_year", torch.zeros(ctx.n_items + 1, dtype=torch.long))
        if embedding_tower(cfg) and d != e:
            raise ValueError(f'tower = "embedding" needs dim = emb_dim, got {d} and {e}')
        self.mlp = tower_map(cfg, 3 * e)
        nn.init.normal_(self.id_emb.weight, std=0.05)

    def set_features(self, genres: np.ndarray, year: np.ndarray) -> None:
        """Copy the dataset's item feature tables in (they then travel inside the checkpoint)."""
        g = torch.as_tensor(genres, dtype=torch.long)
        if g.ndim == 2 and g.shape[1] == 0:
            g = torch.zeros(g.shape[0], 1, dtype=torch.long)
        self.item_genres = g.to(self.item_genres.device)
        self.item_year = torch.as_tensor(year, dtype=torch.long).to(self.item_year.device)

    def forward(self, items: Tensor) -> Tensor:
        genres = self.item_genres[items]  # (..., G)
        g_mask = (genres > 0).float().unsqueeze(-1)
        g = (self.genre_emb(genres) * g_mask).sum(-2) / g_mask.sum(-2).clamp(min=1.0)
        return combine([self.id_emb(items), g, self.year_emb(self.item_year[items])], self.mlp)


class UserFeatures(nn.Module):
    """Embeddings of gender, age, occupation (0 = unknown), concatenated; with `user_id`, also a user-ID
    embedding of size emb_dim (id 0, an unknown user, is the zero vector). With `tower = "embedding"` every
    embedding is emb_dim wide and `forward` returns their sum (zero when there are none)."""

    def __init__(self, cfg: dict[str, Any], ctx: DataContext) -> None:
        super().__init__()
        e = int(cfg["emb_dim"])
        self.summed = embedding_tower(cfg)
        feat_dim = e if self.summed else max(e // 4, 4)
        self.embs = nn.ModuleList(nn.Embedding(max(v, 1), feat_dim, padding_idx=0) for v in ctx.user_vocab)
        self.out_dim = feat_dim * len(ctx.user_vocab)
        self.id_emb: nn.Embedding | None = None
        if bool(cfg.get("user_id", False)):
            self.id_emb = nn.Embedding(ctx.n_users + 1, e, padding_idx=0)
            nn.init.normal_(self.id_emb.weight, std=0.05)
            with torch.no_grad():
                self.id_emb.weight[0].zero_()
            self.out_dim += e
        if self.summed:
            self.out_dim = e

    def forward(self, q: QueryBatch) -> Tensor:
        parts = [emb(q.user_feats[:, j]) for j, emb in enumerate(self.embs)]
        if self.id_emb is not None:
            if q.users is None:
                raise ValueError("this model reads user ids (user_id = true) but the query has none")
            parts.append(self.id_emb(q.users))
        if self.summed:
            if not parts:
                return torch.zeros(len(q.history), self.out_dim, device=q.history.device)
            return torch.stack(parts).sum(0)
        return torch.cat(parts, dim=-1)


class DNNQueryEncoder(nn.Module):
    """DSSM / YouTubeDNN style: masked mean of the last L history embeddings + user features -> MLP (`tower =
    "embedding"`: their sum, no MLP). `history = false` leaves the history out: the query is the user features
    and user-ID embedding alone (with `tower = "embedding"` and no user features, matrix factorisation)."""

    order_aware = False
    # config keys (besides dim / emb_dim / hidden / user_id) that shape the weights
    weight_keys: tuple[str, ...] = ()

    def __init__(self, cfg: dict[str, Any], ctx: DataContext) -> None:
        super().__init__()
        e = int(cfg["emb_dim"])
        self.item_emb: nn.Embedding | None = None
        if bool(cfg.get("history", True)):
            self.item_emb = nn.Embedding(ctx.n_items + 1, e, padding_idx=0)
            nn.init.normal_(self.item_emb.weight, std=0.05)
            with torch.no_grad():
                self.item_emb.weight[0].zero_()
        self.user = UserFeatures(cfg, ctx)
        self.mlp = tower_map(cfg, (e if self.item_emb is not None else 0) + self.user.out_dim)

    def forward(self, q: QueryBatch) -> Tensor:
        if self.item_emb is None:  # `history = false`: the user alone (MF-like with the user-ID embedding)
            return combine([self.user(q)], self.mlp)
        mask = (q.history > 0).float().unsqueeze(-1)
        h = (self.item_emb(q.history) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return combine([h, self.user(q)], self.mlp)


class SASRecQueryEncoder(nn.Module):
    """Causal self-attention over the history with positional embeddings; the last position + user features."""

    order_aware = True
    weight_keys = ("sasrec_layers", "max_history")

    def __init__(self, cfg: dict[str, Any], ctx: DataContext) -> None:
        super().__init__()
        e = int(cfg["emb_dim"])
        self.max_len = int(cfg["max_history"])
        self.item_emb = nn.Embedding(ctx.n_items + 1, e, padding_idx=0)
        self.pos_emb = nn.Embedding(self.max_len, e)
        self.n_heads = int(cfg.get("sasrec_heads", 2))
        nn.init.normal_(self.item_emb.weight, std=0.05)
        layer = nn.TransformerEncoderLayer(
            d_model=e,
            nhead=self.n_heads,
            dim_feedforward=2 * e,
            dropout=float(cfg.get("dropout", 0.0)),
            batch_first=True,
            norm_first=True,
            activation="gelu",
        )
        self.blocks = nn.TransformerEncoder(
            layer, int(cfg.get("sasrec_layers", 2)), enable_nested_tensor=False
        )
        self.norm = nn.LayerNorm(e)
        self.user = UserFeatures(cfg, ctx)
        self.out = tower_map(cfg, e + self.user.out_dim)

    def forward(self, q: QueryBatch) -> Tensor:
        hist = q.history[:, -self.max_len :]
        b, length = hist.shape
        pos = torch.arange(length, device=hist.device).unsqueeze(0).expand(b, length)
        x = self.item_emb(hist) + self.pos_emb(pos)
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=hist.device), diagonal=1)
        # Padding keys are hidden, but every position may always see itself, so no attention row is empty
        # (an empty row gives NaN, which would leak through later layers as 0 * NaN).
        eye = torch.eye(length, dtype=torch.bool, device=hist.device)
        mask = causal.unsqueeze(0) | ((hist == 0).unsqueeze(1) & ~eye.unsqueeze(0))  # (B, L, L)
        mask = mask.repeat_interleave(self.n_heads, dim=0)
        x = self.blocks(x, mask=mask)
        last = self.norm(x[:, -1])
        return combine([last, self.user(q)], self.out)


class GRU4RecQueryEncoder(nn.Module):
    """GRU4Rec style: a GRU over the ordered history; its hidden state after the most recent item + user
    features -> MLP.

    The history is left-padded. Rather than run the GRU through the padding (its biases move the state even on
    zero inputs, so the state would depend on how much padding a row has), each row is rotated so its items come
    first and the batch is packed with the true lengths: the GRU sees exactly the user's items, oldest first, and
    h_n is the state after the last one, whatever the padding. An empty history reads one padding item (zero
    embedding) and so gives a constant state."""

    order_aware = True
    weight_keys = ("gru_layers",)

    def __init__(self, cfg: dict[str, Any], ctx: DataContext) -> None:
        super().__init__()
        e = int(cfg["emb_dim"])
        self.max_len = int(cfg["max_history"])
        dropout = float(cfg.get("dropout", 0.0))
        layers = int(cfg.get("gru_layers", 1))
        self.item_emb = nn.Embedding(ctx.n_items + 1, e, padding_idx=0)
        nn.init.normal_(self.item_emb.weight, std=0.05)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.emb_dropout = nn.Dropout(dropout)
        # torch applies GRU dropout between layers only (and warns if it is set with one layer)
        self.gru = nn.GRU(e, e, num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.user = UserFeatures(cfg, ctx)
        self.out = tower_map(cfg, e + self.user.out_dim)

    def forward(self, q: QueryBatch) -> Tensor:
        hist = q.history[:, -self.max_len :]
        length = hist.shape[1]
        n = (hist > 0).sum(1)
        # left-padded -> items first: row r's column j reads column (j + pads_r) mod L
        cols = (torch.arange(length, device=hist.device).unsqueeze(0) + (length - n).unsqueeze(1)) % length
        x = self.emb_dropout(self.item_emb(hist.gather(1, cols)))
        packed = nn.utils.rnn.pack_padded_sequence(
            x, n.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        _, h_n = self.gru(packed)  # (layers, B, e), back in the batch's order
        return combine([h_n[-1], self.user(q)], self.out)


QUERY_ENCODERS: dict[str, type[nn.Module]] = {
    "dnn": DNNQueryEncoder,
    "sasrec": SASRecQueryEncoder,
    "gru4rec": GRU4RecQueryEncoder,
}


def is_order_aware(name: str) -> bool:
    """Whether query encoder `name` reads the order of the history (and so refuses unordered data)."""
    return bool(getattr(QUERY_ENCODERS.get(str(name)), "order_aware", False))


def build_query_encoder(cfg: dict[str, Any], ctx: DataContext) -> nn.Module:
    return QUERY_ENCODERS[str(cfg["query_encoder"])](cfg, ctx)
