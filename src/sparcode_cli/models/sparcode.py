"""SparCode (Su et al., SIGIR 2023): a user's score for item i is a sum of K_u rows (K_u x P with multi-probe
serving, below) of one fixed code x item table, so it is retrievable from a sparse code -> item index (DESIGN §2
steps 1-5).

    E_q(q) -> K_u linear heads -> z_1..z_{K_u} in R^D -> quantizer -> ẑ_k (a code id each)
    E_i(i) -> K_i linear heads -> t_1..t_{K_i}  in R^D
    g(ẑ, t(i)) = sum_j <ẑ, t_j>/tau + h(ẑ, t(i))           (models/interaction.py, shared with all-to-all)
    score(u, i) = sum_k ReLU(g~(ẑ_k, i) - theta_{ẑ_k} + b)       (g~: g standardised over items, below)
                  served: the sum also runs over each token's P nearest codes (`probes`, below)

Quantizer (models/quantizer.py): residual, M stages over the whole token, each quantizing what the earlier left,
ẑ the sum; M codebooks of `n_codewords` N give N^M code ids. Codebooks follow EMAs of their assignments, not the
optimiser; the commitment loss pulls tokens toward them.

The cut. Each code's row of g is standardised over items, g~ = (g - mean_c) / std_c (a LayerNorm over items
without the affine part: a code can lift some items only by lowering others), and cut at theta_c, the row's
(1 - density) quantile: every row keeps its own best `target_density` of items, none is empty, and the
index density is the target by construction. In training the statistics are taken over `density_items`
uniform probe items per batch (gradient through mean and std, theta detached), in the index over every
item. b = 0 unless `sparcode index --bias` shifts every row's cut by the same amount (in std units).

Training logits: the forward pass is the exact ReLU (what is zero in training is absent from the index),
summed over the K_u codes and times a learned softmax scale (`logit_scale`, log-parametrised, clamped at
100; it changes no ranking and is not stored). For the positives only, the backward pass leaks with slope
`leak` below the cut, annealed linearly to 0 over `leak_steps` steps. `aux_loss` = the commitment loss, plus
`distill` x KL(softmax(s_T) || softmax(a S)) when the model has a teacher: S(u, i) = sum_k g~(ẑ_k, i), the
user's K_u standardised rows before the cut, over the batch's positive and negatives; s_T the training logits
of the two-tower the warm start copied, kept frozen (models/teacher.py); a = std(s_T) / std(S) per user,
detached. The cut objective alone drifts from what the warm start ranks well; the teacher holds the dense
rows to it, and the cut keeps their top.

From scratch, the density target falls log-linearly from 1 to `target_density` over `density_warmup` steps
(buffer `row_density`), and checkpoints are selectable only once it is at the target (`selectable`); the
tokens reach g unquantized for the first `quantize_after` steps, then the codebooks are k-means of that
step's tokens.

Warm start (`init_from_run`, what `make reproduce` does) from a two-tower run: its encoders, token heads =
identity + `head_noise` x their init, h = 0 (`zero_cross`), codebooks by k-means of every training user's
tokens, quantized and cut at the target from step 0. The trainer validates this start at epoch 0 and keeps
it as the best checkpoint unless a trained epoch does better on validation.

Serving: g sees the user only through its code ids, so the scores form a fixed (n_codes, n_items + 1)
table. `score_codes` computes its rows (what `sparcode index` stores); `score_all` adds a user's rows
in ascending code-id order (count x row for a repeated code), as the index's serving kernel does
(retrieval/sparse_index.py), so the index gives exact model scores bit for bit. Multi-probe (`probes`
P, serving only, as IVF's nprobe): each token reads the rows of its P nearest codes (a beam over the
codebooks, `ResidualQuantizer.nearest`; it always includes the code trained on, which is P = 1), K_u x P
code ids per user. The rows are the same; validation, the index and exact scoring all use P. A score of exactly 0 means "not retrieved".

Why the model has this form (the alternatives and their measurements): experiments/results/
sparcode-design-history.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sparcode_cli.errors import UserError
from sparcode_cli.models.base import DataContext, QueryBatch, TrainOutput
from sparcode_cli.models.interaction import CodeSide, TokenCross
from sparcode_cli.models.quantizer import ResidualQuantizer
from sparcode_cli.models.teacher import TwoTowerTeacher


class _LeakyCut(torch.autograd.Function):
    """Forward: exact ReLU. Backward: slope 1 above the cut and `slope` below it."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, slope: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.slope = slope
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        return grad * torch.where(x > 0, 1.0, ctx.slope).to(grad.dtype), None


def leaky_cut(x: Tensor, slope: float) -> Tensor:
    return _LeakyCut.apply(x, slope) if slope > 0 else F.relu(x)


class SparCode(TokenCross):
    name = "sparcode"
    exclude_nonpositive = True  # metrics/retrieval: a score <= 0 is "not retrieved"

    PROBE_CODES, PROBE_ITEMS, PROBE_SEED = 256, 1024, 20231130
    CODE_BLOCK = 32
    ROW_CACHE_BYTES = 1 << 30  # eval-mode cache of code rows (score_all)
    STD_EPS = 1e-6

    def __init__(self, cfg: dict[str, Any], ctx: DataContext) -> None:
        super().__init__(cfg, ctx)
        # a run from before the key existed quantized with the product quantizer, since removed
        quantizer = str(cfg.get("quantizer", "product"))
        if quantizer != "residual":
            raise UserError(
                f"this SparCode run uses model.quantizer = {quantizer!r}, which sparcode no longer has (the "
                "product quantizer lost its ablation to the residual one and was removed)",
                "retrain the run with the current defaults: sparcode train --model sparcode",
            )
        self.quantizer = ResidualQuantizer(
            self.token_dim,
            int(cfg.get("m", 2)),
            int(cfg.get("n_codewords", 64)),
            beta=float(cfg.get("beta", 0.25)),
            decay=float(cfg.get("ema_decay", 0.99)),
            dead_threshold=float(cfg.get("dead_threshold", 0.0625)),
            kmeans_iters=int(cfg.get("kmeans_iters", 10)),
        )
        self.target_density = float(cfg.get("target_density", 0.05))
        self.density_warmup = int(cfg.get("density_warmup", 300))
        self.quantize_after = int(cfg.get("quantize_after", 100))
        self.leak, self.leak_steps = float(cfg.get("leak", 0.1)), int(cfg.get("leak_steps", 2000))
        self.density_items = int(cfg.get("density_items", 128))
        self.distill = float(cfg.get("distill", 0.0))
        self.probes = int(cfg.get("probes", 1))  # serving: code ids read per user token (multi-probe)
        self.teacher = TwoTowerTeacher(cfg, ctx) if self.distill > 0 else None
        init_scale = float(cfg.get("logit_scale", 5.0))
        self.log_logit_scale = torch.nn.Parameter(torch.tensor(math.log(init_scale)))
        self.register_buffer("bias", torch.tensor(0.0))  # b: 0 but for `sparcode index --bias`
        self.register_buffer("n_steps", torch.tensor(0, dtype=torch.long))
        # the fraction of items each code row keeps now (follows the density target; the index recomputes
        # every row's threshold over all items from it)
        self.register_buffer("row_density", torch.tensor(1.0))
        self._batch_density: float | None = None  # the last training batch's density over its probe items
        self._density_ema: float | None = None
        self._row_cache: dict[int, Tensor] = {}
        self._row_cache_key: tuple[float, float] | None = None

    @property
    def n_codes(self) -> int:
        return self.quantizer.n_codes

    def current_target(self) -> float:
        """The density each row is cut at now: log-linear from 1 (dense) down to target_density over
        `density_warmup` steps."""
        frac = min(1.0, int(self.n_steps) / self.density_warmup) if self.density_warmup > 0 else 1.0
        return float(self.target_density**frac)

    def leak_slope(self) -> float:
        if self.leak_steps <= 0:
            return 0.0
        return self.leak * max(0.0, 1.0 - int(self.n_steps) / self.leak_steps)

    # -- training -------------------------------------------------------------------------------------
    def train_output(self, q: QueryBatch, pos: Tensor, neg: Tensor) -> TrainOutput:
        b_size = len(pos)
        z = self.user_tokens(q)  # (B, K_u, D)
        if int(self.n_steps) < self.quantize_after:  # warm-up: unquantized tokens, codebooks untouched
            zq, commit = z, z.new_zeros(())
        else:  # the first quantized batch initialises the codebooks (k-means of its tokens)
            zq, _, commit = self.quantizer(z)
        c = self.interaction.code_side(zq.reshape(-1, self.token_dim))
        t = self.tokens_of(torch.cat([pos, neg]))  # one item-tower pass for positives and negatives
        it = self.interaction.item_side(t)
        it_pos, it_neg = it[:b_size], it[b_size:]
        g_neg = self.interaction.table(c, it_neg)  # (B*K_u, S): the shared negatives' item side, once
        g_pos = self.interaction.paired(c.rows(b_size, self.k_u), it_pos)  # (B, K_u)
        # Uniform probe items: the rows' statistics and cut are measured on them (the index counts every item
        # alike).
        probe = torch.randint(1, self.ctx.n_items + 1, (self.density_items,), device=pos.device)
        g_probe = self.interaction.table(c, self.interaction.item_side(self.tokens_of(probe)))  # (B*K_u, P)
        # Each code's row standardised over items: the statistics over the uniform probe items here, over every
        # item in the index, with gradient through them (a LayerNorm over items).
        mu = g_probe.mean(1, keepdim=True)
        sd = g_probe.std(1, keepdim=True) + self.STD_EPS
        g_probe = (g_probe - mu) / sd
        g_neg = (g_neg - mu) / sd
        g_pos = (g_pos - mu.reshape(b_size, self.k_u)) / sd.reshape(b_size, self.k_u)
        # each row cut at its own (1 - target) quantile over the probe items (b is 0 in training)
        with torch.no_grad():
            row_b = -self.row_thresholds(g_probe.detach(), self.current_target())  # (B*K_u, 1)
            self._batch_density = float((g_probe.detach() + row_b > 0).float().mean())
        x_neg = g_neg + row_b
        x_pos = g_pos + row_b.reshape(b_size, self.k_u)
        # the learned softmax scale: a temperature, it changes no ranking and is not stored in the index
        scale = self.log_logit_scale.clamp(max=math.log(100.0)).exp()
        neg_logits = scale * F.relu(x_neg).reshape(b_size, self.k_u, -1).sum(1)
        pos_logits = scale * leaky_cut(x_pos, self.leak_slope()).sum(1)
        aux = commit
        if self.has_teacher():
            dense = torch.cat([g_pos.sum(1, keepdim=True), g_neg.reshape(b_size, self.k_u, -1).sum(1)], 1)
            aux = aux + self.distill * self.distill_loss(dense, self.teacher_logits(q, pos, neg))
        return TrainOutput(pos_logits, neg_logits, aux)

    def has_teacher(self) -> bool:
        """A warm start's two-tower to distil from: `distill` > 0 and `init_from_run` filled it (from scratch
        there is none, and the trainer says so)."""
        return self.teacher is not None and bool(self.teacher.ready)

    def teacher_logits(self, q: QueryBatch, pos: Tensor, neg: Tensor) -> Tensor:
        assert self.teacher is not None
        return self.teacher.logits(q, pos, neg)

    @staticmethod
    def distill_loss(dense: Tensor, teacher: Tensor) -> Tensor:
        """KL(softmax(teacher) || softmax(a x dense)) per row, averaged: dense (B, 1 + S) is the sum of the user's
        K_u standardised rows before the cut, a = std(teacher) / std(dense) per row (detached), so the student
        is compared at the teacher's spread and no temperature is tuned."""
        a = (teacher.std(1, keepdim=True) / (dense.std(1, keepdim=True) + 1e-6)).detach()
        return F.kl_div(
            F.log_softmax(a * dense, 1), F.log_softmax(teacher, 1), log_target=True, reduction="batchmean"
        )

    def _normalise_rows(self, g: Tensor) -> Tensor:
        """Each row (code) of a full (codes, n_items + 1) table standardised over items 1..n_items."""
        real = g[:, 1:]
        return (g - real.mean(1, keepdim=True)) / (real.std(1, keepdim=True) + self.STD_EPS)

    @staticmethod
    def row_thresholds(g: Tensor, density: float) -> Tensor:
        """(rows, 1): per row the value that exactly max(1, round(density x n)) of its n entries exceed (ties
        aside); below the row's minimum when every entry is kept."""
        n = g.shape[1]
        keep = max(1, round(density * n))
        if keep >= n:
            return g.min(1, keepdim=True).values - 1.0
        return g.kthvalue(n - keep, dim=1, keepdim=True).values

    def selectable(self) -> bool:
        """Checkpoints are selected only once the density target has reached its final value."""
        return int(self.n_steps) >= self.density_warmup

    def after_step(self) -> None:
        """One step on: the row density follows the density target; the batch density enters its EMA."""
        self.n_steps += 1
        self.row_density.fill_(self.current_target())
        if self._batch_density is None:
            return
        rho = self._batch_density
        self._density_ema = rho if self._density_ema is None else 0.95 * self._density_ema + 0.05 * rho
        self._batch_density = None

    def epoch_stats(self) -> dict[str, Any]:
        stats = self.quantizer.usage_stats(reset=True)
        stats["bias"] = round(float(self.bias), 4)
        stats["row_density"] = round(float(self.row_density), 4)
        stats["logit_scale"] = round(float(self.log_logit_scale.detach().exp()), 3)
        stats["train_density"] = None if self._density_ema is None else round(self._density_ema, 4)
        stats["probe_density"] = round(self.probe_density(), 4)
        stats["target"] = round(self.current_target(), 4)
        stats["leak_slope"] = round(self.leak_slope(), 4)
        return stats

    @torch.no_grad()
    def probe_density(self) -> float:
        """Density of the cut scores on a fixed probe of (code, item) pairs (fixed seed, uniform codes and items)."""
        g = torch.Generator().manual_seed(self.PROBE_SEED)
        codes = torch.randint(self.n_codes, (self.PROBE_CODES,), generator=g)
        items = torch.randint(
            1, self.ctx.n_items + 1, (min(self.PROBE_ITEMS, self.ctx.n_items),), generator=g
        )
        was = self.training
        self.eval()
        try:
            dev = self.bias.device
            return float((self.score_codes(codes.to(dev), items.to(dev)) > 0).float().mean())
        finally:
            self.train(was)

    # -- codes and the code x item table ------------------------------------------------------------------
    @torch.no_grad()
    def codes(self, q: QueryBatch) -> Tensor:
        """(B, K_u x probes) int64 code ids in [0, N^M): each query token's `probes` nearest codes, nearest
        first (probes 1: the quantizer's own assignment, the code trained on). Never changes a codebook."""
        return self.quantizer.nearest(self.user_tokens(q), self.probes).flatten(1)

    @torch.no_grad()
    def score_codes(self, code_ids: Tensor, items: Tensor | None = None) -> Tensor:
        """The cut rows ReLU(g~(ẑ(code), i) - theta_code + b) of the given code ids (n_codes,).

        items None: every item, (n_codes, n_items + 1) with column 0 = 0 (padding); else the given item ids,
        (n_codes, len(items)) (full rows are computed either way: a row is standardised and cut over all items).
        Works in blocks of CODE_BLOCK codes with bounded memory; item tokens are cached in eval.
        """
        ids = code_ids.reshape(-1)
        _, side = self._all_items()
        # Fixed blocks of CODE_BLOCK codes (the last one padded by repetition): every row goes through
        # matrix products and row reductions of one shape, so a code's row is bit-identical however the caller
        # chunks code ids (BLAS takes other paths, with other rounding, for very few rows).
        n = len(ids)
        pad = (-n) % self.CODE_BLOCK
        if pad:
            ids = torch.cat([ids, ids[-1:].expand(pad)]) if n else ids.new_zeros(self.CODE_BLOCK)
        z = self.quantizer.decode(ids)
        blocks = []
        if self.interaction._compiled(side.b):
            # the compiled kernel computes every element and every row's cut on its own: only the code side (a
            # matmul) needs the fixed blocks; one call writes every row, and the rows are returned as they are
            sides = [
                self.interaction.code_side(z[p : p + self.CODE_BLOCK])
                for p in range(0, len(z), self.CODE_BLOCK)
            ]
            cs = CodeSide(torch.cat([c.z for c in sides]), torch.cat([c.a for c in sides]))
            out = self.interaction.table_cut(
                cs, side, float(self.row_density), float(self.bias), self.STD_EPS
            )[:n]
            return out if items is None else out[:, items.reshape(-1)]
        for s in range(0, len(z), self.CODE_BLOCK):
            g = self._normalise_rows(
                self.interaction.table(self.interaction.code_side(z[s : s + self.CODE_BLOCK]), side)
            )
            g = g - self.row_thresholds(g[:, 1:], float(self.row_density))
            blocks.append(F.relu(g + self.bias))
        out = torch.cat(blocks)[:n]
        out[:, 0] = 0.0
        return out if items is None else out[:, items.reshape(-1)]

    @torch.no_grad()
    def score_all(self, q: QueryBatch) -> Tensor:
        """Exact model scores (B, n_items + 1), column 0 = -inf: the sum of the score_codes rows of each user's
        K_u x probes codes, accumulated in ascending code-id order (count x row for a repeated code), as the sparse
        index's serving kernel does, so the index reproduces these numbers exactly."""
        codes = self.codes(q)  # (B, K_u x probes)
        uniq, inv = torch.unique(codes, return_inverse=True)  # uniq sorted
        rows = self._cached_rows(uniq)  # (U, n_items + 1)
        srt = inv.sort(dim=1).values
        out = torch.zeros(len(codes), rows.shape[1], dtype=rows.dtype, device=rows.device)
        for p in range(codes.shape[1]):
            col = srt[:, p]
            first = torch.ones_like(col, dtype=torch.bool) if p == 0 else col != srt[:, p - 1]
            count = (srt == col.unsqueeze(1)).sum(1).to(rows.dtype)
            out += torch.where(first.unsqueeze(1), count.unsqueeze(1) * rows[col], 0.0)
        out[:, 0] = float("-inf")
        return out

    def _cached_rows(self, uniq: Tensor) -> Tensor:
        """score_codes(uniq), with the rows of earlier calls kept while the weights, the bias and the row
        density stay (eval mode only, up to ROW_CACHE_BYTES): a full evaluation then scores each code once,
        not once per user batch (on Gowalla ~1,500 codes per batch of 512 users, ~4,000 in all). Rows are
        bit-identical however they are chunked (score_codes), so cached and fresh rows agree exactly."""
        if self.training:
            return self.score_codes(uniq)
        key = (float(self.bias), float(self.row_density))
        if self._row_cache_key != key:
            self._row_cache, self._row_cache_key = {}, key
        cache = self._row_cache
        ids = uniq.tolist()
        missing = [c for c in ids if c not in cache]
        if missing:
            fresh = self.score_codes(torch.tensor(missing, dtype=torch.long, device=uniq.device))
            row_bytes = fresh.shape[1] * fresh.element_size()
            if (len(cache) + len(missing)) * row_bytes > self.ROW_CACHE_BYTES:
                # over budget: keep only this batch's rows (the cached ones it reads too)
                kept = {c: cache[c] for c in ids if c in cache}
                cache.clear()
                cache.update(kept)
            cache.update(zip(missing, fresh, strict=True))
        return torch.stack([cache[c] for c in ids])

    def clear_cache(self) -> None:
        super().clear_cache()
        self._row_cache, self._row_cache_key = {}, None

    def load_state_dict(self, state_dict: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        """Also a checkpoint saved while `model.cut` and `model.row_norm` existed (it has the global cut's flag
        `bias_initted`): loaded if it used the per-row cut of standardised rows, refused if not."""
        if "bias_initted" in state_dict:
            old = (self.cfg.get("cut", "global"), self.cfg.get("row_norm", "center"))
            if old != ("row", "standard"):
                raise UserError(
                    f"this checkpoint was trained with model.cut = {old[0]!r} and model.row_norm = {old[1]!r}; "
                    'only cut = "row" with row_norm = "standard" remains (experiments/results/'
                    "sparcode-design-history.md)",
                    hint="score it with a checkout from before their removal, or train it again",
                )
            state_dict = {k: v for k, v in state_dict.items() if k != "bias_initted"}
        return super().load_state_dict(state_dict, *args, **kwargs)

    # -- warm start -------------------------------------------------------------------------------------------
    def init_from_run(
        self, ckpt: dict[str, Any], queries: QueryBatch | Iterable[QueryBatch] | None = None
    ) -> None:
        """Warm start from a trained two-tower checkpoint: encoders copied, token heads = identity (+ noise), so
        the tokens start as the two-tower vectors; codebooks from k-means of those user tokens (eval mode: no
        dropout), now when `queries` are given (the trainer gives every training user's query), else on the
        first training batch; the row density starts at the density target's first value."""
        self._copy_two_tower(ckpt)
        if self.teacher is not None:
            self.teacher.load_two_tower(ckpt)
        self.quantizer.initted.fill_(False)
        self.n_steps.fill_(self.density_warmup)  # past the density warm-up: cut at the target from step 0
        self.row_density.fill_(self.current_target())
        self.quantize_after = 0  # the tokens are trained already: k-means of them now, or of the first batch
        if queries is None:
            return
        batches = [queries] if isinstance(queries, QueryBatch) else queries
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                dev = self.row_density.device
                z = torch.cat([self.user_tokens(q.to(dev)).reshape(-1, self.token_dim) for q in batches])
        finally:
            self.train(was)
        self.quantizer.init_from(z)
