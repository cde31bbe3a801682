"""The all-to-all interaction g(z, t(i)) and the token towers that SparCode and all-to-all share (DESIGN §2.3-4).

    g(z, t_1..t_{K_i}) = sum_j <z, t_j> / tau  +  h(z, t_1..t_{K_i})

`h` = `mlp`:       sum_j MLP(A z + B t_j). The first layer splits into a per-code part A z and a per-item part
                   B t_j + bias; both are precomputed and added, so a (code, item) pair costs only the
                   activation and the deeper layers. The last layer is linear without bias, so the sum over j
                   is taken before it (one projection per pair instead of K_i).
`h` = `attention`: one cross-attention head from the code to the item's tokens, whose keys and values are
                   precomputed per item: o = sum_j softmax_j(<W_q z, k_j>/sqrt(H)) v_j, then
                   h = <w, act(o + U z)> (pooled to a scalar).

Both sides are computed once (`code_side`, `item_side`); `table` gives the full (n_codes, n_items) cross in
batched ops (call it on chunks of codes: memory is n_codes * n_items * K_i * H floats), `paired` gives each
row's codes against that row's own item (the training positives).

`TokenCross` holds what both models share: the query encoder, the item encoder, K_u user-token heads, K_i
item-token heads, the interaction, and the eval-mode cache of every item's tokens and precomputed item side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparcode_cli.config import IDENTITY_UNLESS_CHANGED
from sparcode_cli.models import fused_table
from sparcode_cli.models.base import DataContext, QueryBatch, Recommender
from sparcode_cli.models.encoders import QUERY_ENCODERS, ItemEncoder, build_query_encoder, embedding_tower

INTERACTIONS = ("mlp", "attention")


@dataclass
class CodeSide:
    z: Tensor  # (..., D) for the dot path
    a: Tensor  # (..., H) mlp: A z; attention: the query W_q z / sqrt(H)
    u: Tensor | None = None  # (..., H) attention: U z

    def rows(self, b: int, k: int) -> CodeSide:
        """(b * k, ...) -> (b, k, ...): the flat codes of b rows of k tokens each, for `paired`."""
        return CodeSide(
            *(None if v is None else v.reshape(b, k, v.shape[-1]) for v in (self.z, self.a, self.u))
        )


@dataclass
class ItemSide:
    tsum: Tensor  # (..., D) sum_j t_j for the dot path
    b: Tensor  # (..., K_i, H) mlp: B t_j + bias; attention: keys k_j
    v: Tensor | None = None  # (..., K_i, H) attention: values v_j

    def __getitem__(self, idx: Any) -> ItemSide:
        return ItemSide(self.tsum[idx], self.b[idx], None if self.v is None else self.v[idx])


class Interaction(nn.Module):
    """g(z, t(i)): a dot-product path plus a learned cross `h` (`mlp` or `attention`)."""

    def __init__(
        self,
        dim: int,
        kind: str = "mlp",
        hidden: int = 32,
        layers: int = 1,
        tau: float = 0.05,
    ) -> None:
        super().__init__()
        if kind not in INTERACTIONS:
            raise ValueError(f"interaction must be one of {INTERACTIONS}, got {kind!r}")
        self.kind, self.dim, self.hidden, self.tau = kind, int(dim), int(hidden), float(tau)
        h = self.hidden
        if kind == "mlp":
            # The first layer of MLP([z; t_j]) is Linear(2D -> H) = A z + B t_j + bias, split in two.
            self.code_proj = nn.Linear(dim, h, bias=False)  # A
            self.item_proj = nn.Linear(dim, h)  # B (+ the first layer's bias)
            self.deep = nn.ModuleList(nn.Linear(h, h) for _ in range(int(layers) - 1))
        else:
            self.code_proj = nn.Linear(dim, h, bias=False)  # W_q
            self.item_proj = nn.Linear(dim, h)  # keys
            self.value_proj = nn.Linear(dim, h)  # values
            self.code_skip = nn.Linear(dim, h, bias=False)  # U
        self.out = nn.Linear(h, 1, bias=False)  # w; no bias: a constant on every score ranks nothing
        nn.init.normal_(self.out.weight, std=0.02)

    # -- the two precomputable sides -----------------------------------------------------------------
    def code_side(self, z: Tensor) -> CodeSide:
        if self.kind == "mlp":
            return CodeSide(z, self.code_proj(z))
        return CodeSide(z, self.code_proj(z) / math.sqrt(self.hidden), self.code_skip(z))

    def item_side(self, t: Tensor) -> ItemSide:
        """t (..., K_i, D) item tokens."""
        if self.kind == "mlp":
            return ItemSide(t.sum(-2), self.item_proj(t))
        return ItemSide(t.sum(-2), self.item_proj(t), self.value_proj(t))

    def _compiled(self, x: Tensor) -> bool:
        """Whether `table` takes the compiled kernel (one-hidden-layer mlp, CPU float32, no autograd)."""
        return self.kind == "mlp" and len(self.deep) == 0 and fused_table.usable(x)

    # -- pairs -------------------------------------------------------------------------------------------
    def _mlp_tail(self, x: Tensor) -> Tensor:
        """x (..., K_i, H) first-layer pre-activations -> (...) sum_j MLP."""
        x = F.relu(x)
        for layer in self.deep:
            x = F.relu(layer(x))
        return self.out(x.sum(-2)).squeeze(-1)

    def table(self, c: CodeSide, it: ItemSide) -> Tensor:
        """Every code against every item: c (C, ...) x it (I, ...) -> (C, I)."""
        if self._compiled(c.a):  # inference on the CPU: the compiled kernel, dot path included (~15x faster)
            w = self.out.weight.reshape(-1)
            return fused_table.split_mlp_table(c.a, it.b, w, c.z, it.tsum, self.tau)
        dot = c.z @ it.tsum.T / self.tau
        if self.kind == "mlp":
            if len(self.deep) == 0:  # the default one-hidden-layer h: a fused, cache-sized, chunked kernel
                return dot + _SplitMLP.apply(c.a, it.b, self.out.weight.reshape(-1))
            return dot + self._mlp_tail(c.a[:, None, None, :] + it.b.unsqueeze(0))
        n_items, k_i, h = it.b.shape
        logits = (c.a @ it.b.reshape(-1, h).T).reshape(-1, n_items, k_i)  # (C, I, K_i)
        alpha = logits.softmax(-1)
        assert it.v is not None and c.u is not None
        o = torch.bmm(alpha.transpose(0, 1), it.v).transpose(0, 1)  # (C, I, H)
        return dot + self.out(F.relu(o + c.u[:, None, :])).squeeze(-1)

    def table_cut(self, c: CodeSide, it: ItemSide, density: float, bias: float, eps: float) -> Tensor:
        """The compiled `table` with every row cut as fused_table.row_cut does, in the same kernel (the
        compiled path only: `_compiled` must hold)."""
        w = self.out.weight.reshape(-1)
        return fused_table.split_mlp_table_cut(c.a, it.b, w, c.z, it.tsum, self.tau, density, bias, eps)

    def paired(self, c: CodeSide, it: ItemSide) -> Tensor:
        """Row-wise: c (B, K, ...) codes against it (B, ...) one item per row -> (B, K)."""
        dot = (c.z * it.tsum.unsqueeze(1)).sum(-1) / self.tau
        if self.kind == "mlp":
            return dot + self._mlp_tail(c.a.unsqueeze(2) + it.b.unsqueeze(1))
        logits = torch.einsum("bkh,bjh->bkj", c.a, it.b)
        assert it.v is not None and c.u is not None
        o = torch.einsum("bkj,bjh->bkh", logits.softmax(-1), it.v)
        return dot + self.out(F.relu(o + c.u)).squeeze(-1)

    def table_chunked(self, z: Tensor, it: ItemSide, max_elems: int = 1 << 23) -> Tensor:
        """`table` for many codes z (C, D), in chunks of codes bounded by `max_elems` intermediate floats."""
        per_code = max(1, it.b.shape[0] * it.b.shape[1] * self.hidden)
        if self._compiled(z):
            # the compiled kernel keeps no (C, I, K_i, H) intermediate: bound the output instead, so the item
            # side streams through the cache once per ~hundreds of codes, not once per ~3 (Gowalla)
            per_code = max(1, it.b.shape[0])
        step = max(1, max_elems // per_code)
        return torch.cat([self.table(self.code_side(z[s : s + step]), it) for s in range(0, len(z), step)])


class TokenCross(Recommender):
    """Encoders + K_u user-token heads + K_i item-token heads + g. Subclassed by SparCode and AllToAll."""

    def __init__(self, cfg: dict[str, Any], ctx: DataContext) -> None:
        super().__init__(cfg, ctx)
        d = int(cfg["dim"])
        self.k_u, self.k_i = int(cfg.get("k_u", 4)), int(cfg.get("k_i", 2))
        self.token_dim = int(cfg.get("token_dim", d))
        self.normalize = bool(cfg.get("normalize", True))
        self.query_encoder = build_query_encoder(cfg, ctx)
        self.item_encoder = ItemEncoder(cfg, ctx)
        self.user_heads = nn.Linear(d, self.k_u * self.token_dim)
        self.item_heads = nn.Linear(d, self.k_i * self.token_dim)
        self.interaction = Interaction(
            self.token_dim,
            str(cfg.get("interaction", "mlp")),
            int(cfg.get("interaction_hidden", 32)),
            int(cfg.get("interaction_layers", 1)),
            float(cfg.get("tau", 0.05)),
        )
        self._item_cache: tuple[Tensor, ItemSide] | None = None

    # -- towers ------------------------------------------------------------------------------------------
    def _norm(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1) if self.normalize else x

    def user_tokens(self, q: QueryBatch) -> Tensor:
        """(B, K_u, D) unquantized user tokens z_1..z_{K_u}."""
        e = self.query_encoder(q)
        return self._norm(self.user_heads(e).reshape(len(e), self.k_u, self.token_dim))

    def tokens_of(self, items: Tensor) -> Tensor:
        """(n, K_i, D) item tokens t_1..t_{K_i} of the given item ids (always recomputed)."""
        e = self.item_encoder(items)
        return self._norm(self.item_heads(e).reshape(*items.shape, self.k_i, self.token_dim))

    def item_tokens(self) -> Tensor:
        """(n_items + 1, K_i, D) tokens of every item (row 0 = padding); cached in eval mode."""
        return self._all_items()[0]

    def _all_items(self) -> tuple[Tensor, ItemSide]:
        if self._item_cache is not None and not self.training:
            return self._item_cache
        device = self.user_heads.weight.device
        with torch.no_grad():
            t = torch.cat(
                [
                    self.tokens_of(torch.arange(s, min(s + 8192, self.ctx.n_items + 1), device=device))
                    for s in range(0, self.ctx.n_items + 1, 8192)
                ]
            )
            side = self.interaction.item_side(t)
        if not self.training:
            self._item_cache = (t, side)
        return t, side

    def clear_cache(self) -> None:
        self._item_cache = None

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        self.clear_cache()  # .to() / .cuda() / .cpu(): cached rows and item tokens live on the old device
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True) -> TokenCross:
        self.clear_cache()
        return super().train(mode)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self.clear_cache()
        return super().load_state_dict(*args, **kwargs)

    # -- warm start from two-tower ---------------------------------------------------------------------
    def _copy_two_tower(self, ckpt: dict[str, Any]) -> None:
        """Copy the query and item encoders of a two-tower checkpoint. Every token head starts as the identity on
        its first min(dim, token_dim) block plus small noise, so each token starts as the two-tower vector
        (the noise breaks the symmetry between the K_u tokens; training then pulls them apart)."""
        from sparcode_cli.errors import UserError

        if ckpt.get("model") != "two-tower":
            raise UserError(
                f"--init-from needs a two-tower run, got a {ckpt.get('model')!r} checkpoint",
                "train one first: sparcode train --model two-tower",
            )
        tt_cfg = dict(ckpt.get("config", {}))
        if isinstance(tt_cfg.get("model"), dict):  # a full resolved config: its [model] section
            tt_cfg = dict(tt_cfg["model"])
        weight_keys = getattr(QUERY_ENCODERS.get(str(self.cfg.get("query_encoder"))), "weight_keys", ())
        shaping = ["dim", "emb_dim", "tower", "query_encoder", "user_id", "history", *weight_keys]
        if not embedding_tower(self.cfg):  # an embedding tower has no MLP: hidden shapes nothing
            shaping.insert(3, "hidden")
        for key in shaping:
            # a key the two-tower run predates holds the value that reproduces that run
            fallback = IDENTITY_UNLESS_CHANGED.get(("model", key))
            theirs, ours = tt_cfg.get(key, fallback), self.cfg.get(key, fallback)
            if theirs is not None and str(theirs) != str(ours):
                raise UserError(
                    f"--init-from: the two-tower run has {key} = {theirs!r}, this model {ours!r}",
                    f"set the same value: --set model.{key}={theirs}",
                )
        sd = ckpt["state_dict"]
        for prefix in ("query_encoder.", "item_encoder."):
            sub = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
            if not sub:
                raise UserError(f"--init-from: the two-tower checkpoint has no {prefix[:-1]} weights")
            getattr(self, prefix[:-1]).load_state_dict(sub)
        d, td = int(self.cfg["dim"]), self.token_dim
        n = min(d, td)
        with torch.no_grad():
            noise = float(self.cfg.get("head_noise", 0.05))
            for heads, k, scale in ((self.user_heads, self.k_u, noise), (self.item_heads, self.k_i, 0.05)):
                heads.weight.mul_(scale)
                heads.bias.zero_()
                for j in range(k):
                    heads.weight[j * td : j * td + n, :n] += torch.eye(n, device=heads.weight.device)
            if bool(self.cfg.get("zero_cross", False)):  # h starts at 0: g starts as the two-tower score
                self.interaction.out.weight.zero_()
        self.clear_cache()


# -- the fused one-hidden-layer table --------------------------------------------------------------------------
# h(a, b) = sum_j <w, ReLU(a_c + b_ij)> for every (code c, item i). Done naively, autograd keeps and re-reads
# several (C, I, K_i, H) tensors (broadcast add, ReLU, its mask, the broadcast gradient): memory bound and ~3x
# slower on CPU. Here the table is computed in chunks of codes that fit the L2 cache, nothing big is kept for
# backward, and the backward recomputes each chunk's pre-activations in cache.

_CHUNK_FLOATS = (
    1 << 17
)  # ~512 KiB per chunk: measured fastest on a 2-core EPYC (2^15 too much loop, 2^21 misses)
# On a GPU, blocks sized for a CPU cache would make every op a tiny kernel launch; 2^25 floats is 128 MiB per
# block (the backward holds two or three), unmeasured: no GPU has been lent to us yet.
_CHUNK_FLOATS_CUDA = 1 << 25


def _blocks(n_codes: int, n_items: int, k_i: int, h: int, device: torch.device) -> list[tuple[slice, slice]]:
    """(codes, items) blocks of at most ~_CHUNK_FLOATS pre-activations each (_CHUNK_FLOATS_CUDA on CUDA)."""
    floats = _CHUNK_FLOATS_CUDA if device.type == "cuda" else _CHUNK_FLOATS
    per_item = k_i * h
    ib = min(n_items, max(1, floats // per_item))
    cs = max(1, floats // (ib * per_item))
    return [
        (slice(s, s + cs), slice(t, t + ib))
        for s in range(0, n_codes, cs)
        for t in range(0, max(n_items, 1), ib)
    ]


def _split_mlp_forward(a: Tensor, b: Tensor, w: Tensor) -> Tensor:
    n_items, k_i, h = b.shape
    out = a.new_empty(a.shape[0], n_items)
    wk = w.repeat(k_i)  # sum over j folded into one (K_i * H) dot product
    for cs, its in _blocks(a.shape[0], n_items, k_i, h, a.device):
        x = a[cs, None, None, :] + b[its]
        x.relu_()
        out[cs, its] = torch.matmul(x.view(x.shape[0], x.shape[1], k_i * h), wk)
    return out


class _SplitMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(a, b, w)
        return _split_mlp_forward(a, b, w)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a, b, w = ctx.saved_tensors
        h = a.shape[1]
        n_items, k_i, _ = b.shape
        gy = gy.contiguous()
        ga, gb, gw = torch.zeros_like(a), torch.zeros_like(b), torch.zeros_like(w)
        for cs, its in _blocks(a.shape[0], n_items, k_i, h, a.device):
            g = gy[cs, its]
            x = a[cs, None, None, :] + b[its]  # (cs, is, K_i, H), recomputed in cache
            x.relu_()
            gw += torch.mv(x.reshape(-1, h).T, g.reshape(-1).repeat_interleave(k_i))
            x.sign_().mul_(g[:, :, None, None])  # ReLU mask times the incoming gradient
            ga[cs] += x.sum((1, 2))
            gb[its] += x.sum(0)
        return ga * w, gb * w, gw
