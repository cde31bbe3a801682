"""Residual quantizer with EMA codebooks (SparCode's user-side discretiser, DESIGN §2 step 2).

M codebooks of N full D-dim codewords: stage 1 replaces a token z in R^D by its nearest codeword (squared L2),
stage m the residual that stages 1..m-1 left; ẑ is the sum of the M codewords. It replaced DESIGN §2's product
quantizer (M chunks of D/M, one codebook each), which lost its ablation and was removed: product chunks of a
token are quantized independently, so when tokens vary in few directions the chunks' codes move together and
few of the N^M tuples occur (movielens-100k warm start, 3 seeds, cut at 5%: 398-440 of 4,096 tuples and test
Recall@50 0.3412, against the residual's 1,727-1,775 and 0.3512: movielens-100k-sparcode-warm-start.md).

The codebooks are shared by all of a user's K_u tokens. A token's code is the tuple (j_1..j_M), its id sum_m j_m * N^(M-1-m) in [0, N^M) (`ids_from_tuples` / `tuples_from_ids`).

Learning: gradients reach the tokenizer through the straight-through estimator z + sg(ẑ - z); the commitment
loss beta * mean((z - sg(ẑ))^2) pulls tokens toward their codewords (a mean over tokens and dimensions, the
VQ-VAE convention); the codewords themselves are not trained by the optimiser but by exponential moving
averages (decay 0.99) of assignment counts and assigned sums, with Laplace smoothing (eps 1e-5).

Dead codes: after each training update, a codeword whose EMA count is below
`dead_threshold * (tokens in the batch / N)` (the per-batch expectation of a uniformly used code) is
restarted from a random input of its stage in the current batch. With batch 256, K_u 4, N 64 the expectation is
16 per code, and the default dead_threshold 0.0625 makes an EMA count below 1 dead. A restarted code gets
the expected count, so it has ~ln(1/dead_threshold)/(1 - decay) steps to attract inputs before it can die
again.

Initialisation: before the first training batch, each stage's codebook comes from k-means of that
stage's inputs in that batch (`kmeans_iters` > 0) or from random ones (`kmeans_iters` = 0); `init_from(vectors)` does the same
from given tokens (the two-tower warm start). The flag is a buffer, so a loaded checkpoint never re-inits.

Under torchrun (data-parallel training, each rank a slice of the batch) every rank ends each step with the
same codebooks: the first batch's k-means runs on the gathered global batch and is broadcast from rank 0;
the EMA's per-code counts and sums are all-reduced before the update; a restart draws its rows from the
gathered global batch with the RNG state that every rank shares.

Everything that changes a codebook (EMA, restarts, init) happens only in training mode; in eval mode
`forward` is a pure function of the codebooks. Usage counters (codes in use, perplexity, distinct tuples,
restarts) are plain attributes, not saved, and are reset by `usage_stats()`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparcode_cli import distributed as dd


class ResidualQuantizer(nn.Module):
    def __init__(
        self,
        dim: int,
        n_books: int,
        n_codewords: int,
        *,
        beta: float = 0.25,
        decay: float = 0.99,
        eps: float = 1e-5,
        dead_threshold: float = 0.0625,
        kmeans_iters: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.dim, self.M, self.N = int(dim), int(n_books), int(n_codewords)
        self.beta, self.decay, self.eps = float(beta), float(decay), float(eps)
        self.dead_threshold, self.kmeans_iters = float(dead_threshold), int(kmeans_iters)
        g = torch.Generator().manual_seed(seed)
        init = torch.randn(self.M, self.N, self.dim, generator=g) / math.sqrt(self.dim)
        self.register_buffer("codebooks", init)  # (M, N, D)
        self.register_buffer("ema_count", torch.zeros(self.M, self.N))
        self.register_buffer("ema_sum", init.clone())
        self.register_buffer("initted", torch.tensor(False))
        self.reset_usage()

    @property
    def n_codes(self) -> int:
        return self.N**self.M

    # -- code ids ---------------------------------------------------------------------------------------
    def ids_from_tuples(self, tuples: Tensor) -> Tensor:
        """(..., M) codeword indices -> (...) int64 code ids, sum_m j_m * N^(M-1-m)."""
        ids = torch.zeros(tuples.shape[:-1], dtype=torch.long, device=tuples.device)
        for m in range(self.M):
            ids = ids * self.N + tuples[..., m].long()
        return ids

    def tuples_from_ids(self, ids: Tensor) -> Tensor:
        """(...) code ids -> (..., M) codeword indices (inverse of `ids_from_tuples`)."""
        ids = ids.long()
        out = []
        for _ in range(self.M):
            out.append(ids % self.N)
            ids = torch.div(ids, self.N, rounding_mode="floor")
        return torch.stack(out[::-1], dim=-1)

    def _from_tuples(self, t: Tensor) -> Tensor:
        """(..., M) codeword indices -> (..., D): the sum of the M codewords."""
        return torch.stack([self.codebooks[m][t[..., m]] for m in range(self.M)]).sum(0)

    def decode(self, ids: Tensor) -> Tensor:
        """(...) code ids -> (..., D) quantized vectors ẑ, read from the codebooks."""
        return self._from_tuples(self.tuples_from_ids(ids))

    # -- assignment ---------------------------------------------------------------------------------------
    NEAREST_ROWS = 256  # rows per distance block: 16 MB at N = 16,384, so the argmin reads it from cache

    @classmethod
    def _nearest(cls, x: Tensor, cb: Tensor) -> Tensor:
        """x (T, d), cb (N, d) -> (T,) nearest codeword (squared L2; ||x||^2 is constant per row). In row
        blocks: one (T, N) block of 1,024 x 16,384 went through memory twice, 1.6x slower (the same ids)."""
        sq = (cb * cb).sum(-1).unsqueeze(0)
        rows = cls.NEAREST_ROWS
        if len(x) <= rows:
            return torch.addmm(sq, x, cb.T, alpha=-2.0).argmin(-1)
        return torch.cat(
            [torch.addmm(sq, x[s : s + rows], cb.T, alpha=-2.0).argmin(-1) for s in range(0, len(x), rows)]
        )

    def _assign_inputs(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """flat (T, D) -> (idx (T, M), x (M, T, D)): each stage's input (what the earlier stages left) and its
        nearest codeword, greedily stage by stage."""
        r, ins, idx = flat, [], []
        for m in range(self.M):
            ins.append(r)
            idx.append(self._nearest(r, self.codebooks[m]))
            r = r - self.codebooks[m][idx[-1]]
        return torch.stack(idx, 1), torch.stack(ins)

    def assign(self, z: Tensor) -> Tensor:
        """(..., D) -> (..., M) codeword indices, greedily per stage. Pure: changes nothing."""
        idx, _ = self._assign_inputs(z.detach().reshape(-1, self.dim))
        return idx.reshape(*z.shape[:-1], self.M)

    def encode(self, z: Tensor) -> Tensor:
        """(..., D) tokens -> (...) code ids. Pure: changes nothing."""
        return self.ids_from_tuples(self.assign(z))

    @torch.no_grad()
    def nearest(self, z: Tensor, p: int) -> Tensor:
        """(..., D) tokens -> (..., p) code ids, nearest first (squared L2 to the decoded ẑ): the multi-probe
        codes of serving. A beam of width p over the codebooks, p x N candidates per stage, keeps the p best
        partial sums; the greedy code (`encode`, the one the token trained on) takes the last place when the
        beam missed it, so p > 1 always reads the code of p = 1. p = 1 is `encode` bit for bit. Pure: changes
        nothing."""
        if p == 1:
            return self.encode(z).unsqueeze(-1)
        flat = z.detach().reshape(-1, self.dim)
        t = len(flat)
        ids = torch.zeros(t, 1, dtype=torch.long, device=flat.device)
        res = flat.unsqueeze(1)  # what each beam entry leaves, (T, b, D)
        for m in range(self.M):
            cb = self.codebooks[m]  # (N, D)
            sq = (cb * cb).sum(-1)
            d2 = (
                (res * res).sum(-1, keepdim=True) + sq - 2.0 * res @ cb.T
            )  # the error after this stage, (T, b, N)
            top = d2.reshape(t, d2.shape[1] * self.N).topk(min(p, d2.shape[1] * self.N), dim=1, largest=False)
            entry, word = top.indices // self.N, top.indices % self.N
            ids = ids.gather(1, entry) * self.N + word
            res = res.gather(1, entry.unsqueeze(-1).expand(-1, -1, self.dim)) - cb[word]
        # the beam can push the greedy tuple out at a later stage: keep it (the farthest place)
        greedy = self.encode(flat)
        missed = ~(ids == greedy.unsqueeze(1)).any(1)
        ids[missed, -1] = greedy[missed]
        return ids.reshape(*z.shape[:-1], ids.shape[1])

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z (..., D) -> (ẑ with straight-through gradient, code ids (...), commitment loss).

        In training mode this also initialises (first call), EMA-updates and restarts the codebooks.
        """
        flat = z.reshape(-1, self.dim)
        if self.training and not bool(self.initted):
            self.init_from(dd.all_gather_rows(flat.detach()))
            for t in (self.codebooks, self.ema_count, self.ema_sum):
                dd.broadcast_(t)
        idx, x = self._assign_inputs(flat.detach())  # (T, M), (M, T, D)
        zq = self._from_tuples(idx)
        if self.training:
            self._ema_update(x, idx)
            self._track(idx)
        commit = self.beta * F.mse_loss(flat, zq.detach())
        out = flat + (zq - flat).detach()
        return out.reshape(z.shape), self.ids_from_tuples(idx).reshape(z.shape[:-1]), commit

    # -- codebook learning (training mode only) -------------------------------------------------------------
    @torch.no_grad()
    def init_from(self, vectors: Tensor) -> None:
        """Codebooks from k-means (or random picks, kmeans_iters = 0) of `vectors` (T, D), stage by stage: each
        stage of what the earlier stages leave."""
        flat = vectors.detach().float().reshape(-1, self.dim)
        x = flat.unsqueeze(0).repeat(self.M, 1, 1)  # (M, T, D)
        t = x.shape[1]
        g = torch.Generator(device="cpu").manual_seed(1234)
        for m in range(self.M):
            if m > 0:  # this stage's input: the residual after the earlier stages
                prev = self.codebooks[m - 1]
                x[m] = x[m - 1] - prev[self._nearest(x[m - 1], prev)]
            pick = torch.randint(t, (self.N,), generator=g).to(x.device)
            if t >= self.N:
                pick = torch.randperm(t, generator=g)[: self.N].to(x.device)
            c = x[m, pick].clone()
            counts = torch.zeros(self.N, device=x.device)
            for _ in range(self.kmeans_iters):
                a = torch.cdist(x[m], c).argmin(-1)
                counts = torch.bincount(a, minlength=self.N).float()
                sums = torch.zeros_like(c).index_add_(0, a, x[m])
                moved = counts > 0
                c[moved] = sums[moved] / counts[moved].unsqueeze(-1)
                # an empty cluster takes a random point, so k-means does not hand back dead codes
                empty = int((~moved).sum())
                if empty:
                    c[~moved] = x[m, torch.randint(t, (empty,), generator=g).to(x.device)]
            self.codebooks[m] = c
        expected = t / self.N
        self.ema_count.fill_(expected)
        self.ema_sum.copy_(self.codebooks * expected)
        self.initted.fill_(True)

    @torch.no_grad()
    def _ema_update(self, x: Tensor, idx: Tensor) -> None:
        """x (M, T, D): each stage's inputs (`_assign_inputs`), idx (T, M) their codewords."""
        onehot = F.one_hot(idx.transpose(0, 1), self.N).to(x.dtype)  # (M, T, N)
        counts = dd.all_reduce_sum_(onehot.sum(1))  # (M, N), over the global batch
        sums = dd.all_reduce_sum_(torch.bmm(onehot.transpose(1, 2), x))  # (M, N, D)
        t = int(counts[0].sum())  # every token has one codeword per codebook
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.ema_count.sum(-1, keepdim=True)
        smoothed = (self.ema_count + self.eps) / (total + self.N * self.eps) * total  # Laplace
        self.codebooks.copy_(self.ema_sum / smoothed.unsqueeze(-1))
        # dead-code restart from random current inputs
        expected = t / self.N
        dead = self.ema_count < self.dead_threshold * expected  # (M, N)
        n_dead = int(dead.sum())
        if n_dead:
            x = dd.all_gather_rows(x.transpose(0, 1)).transpose(0, 1)  # (M, global T, D)
            for m in range(self.M):
                dm = dead[m].nonzero().squeeze(-1)
                if len(dm) == 0:
                    continue
                pick = torch.randint(t, (len(dm),), device=x.device)
                self.codebooks[m, dm] = x[m, pick]
                self.ema_count[m, dm] = expected
                self.ema_sum[m, dm] = x[m, pick] * expected
            self.restarts += n_dead

    # -- usage statistics -----------------------------------------------------------------------------------
    def reset_usage(self) -> None:
        self.usage = torch.zeros(self.M, self.N, dtype=torch.long)
        self.seen_ids: set[int] = set()
        self.restarts = 0

    @torch.no_grad()
    def _track(self, idx: Tensor) -> None:
        for m in range(self.M):
            self.usage[m] += torch.bincount(idx[:, m].cpu(), minlength=self.N)
        self.seen_ids.update(torch.unique(self.ids_from_tuples(idx)).cpu().tolist())

    def usage_stats(self, reset: bool = True) -> dict[str, Any]:
        """Codes in use and perplexity per codebook, distinct code tuples and restarts since the last reset."""
        if dd.is_distributed():  # the whole global batch's usage
            self.usage = dd.all_reduce_sum_(self.usage.clone())
            self.seen_ids = set().union(*dd.all_gather_object(self.seen_ids))
        p = self.usage.double() / self.usage.sum(-1, keepdim=True).clamp(min=1)
        ent = -(p * p.clamp(min=1e-12).log()).sum(-1)
        out = {
            "codes_in_use": [int(v) for v in (self.usage > 0).sum(-1)],
            "perplexity": [round(float(v), 2) for v in ent.exp()],
            "distinct_tuples": len(self.seen_ids),
            "restarts": int(self.restarts),
        }
        if reset:
            self.reset_usage()
        return out
