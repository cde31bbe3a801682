"""Paired bootstrap over users: a 95% interval for the mean difference of a per-user metric (DESIGN §4).

With a few hundred test users, ±0.01 Recall@20 between two models is within noise, and seeds alone cannot
show it (every seed is scored on the same users). The paired bootstrap resamples *users* with replacement and
recomputes the mean of the per-user differences `a[u] - b[u]`, so what is shared by both models on a user (an
easy or a hard user) cancels out:

    res = paired_bootstrap(recall_sparcode, recall_two_tower, n_boot=2000, seed=0)
    res.diff, res.low, res.high          # mean difference and its 95% percentile interval

`a` and `b` are (U,) per-user values, or (S, U) for S seeds on the same users: each user's values are first
averaged over seeds (the seed noise stays in the mean ± std that the report prints beside it). Users with a NaN
in either array (no targets) are left out. The resampling is seeded, so the interval is reproducible; it is
drawn in chunks as multinomial counts, so memory stays at `chunk x U` whatever `n_boot`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

CHUNK = 256  # bootstrap resamples drawn at once


@dataclass(frozen=True)
class BootstrapResult:
    diff: float  # mean over users of a - b (after averaging seeds)
    low: float  # lower end of the (1 - alpha) percentile interval
    high: float  # upper end
    n_users: int
    n_boot: int
    seed: int
    alpha: float
    prob_positive: float  # fraction of resampled means > 0

    @property
    def verdict(self) -> str:
        """'a > b', 'a < b' or 'no detectable difference' at this level."""
        if self.low > 0:
            return "a > b"
        if self.high < 0:
            return "a < b"
        return "no detectable difference"

    def to_dict(self) -> dict[str, float | int | str]:
        return {**asdict(self), "verdict": self.verdict}


def _per_user(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        return x
    if x.ndim == 2:
        return x.mean(axis=0)  # NaN stays NaN for a user without targets
    raise ValueError(f"expected (U,) or (seeds, U) per-user values, got shape {x.shape}")


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> BootstrapResult:
    """The (1 - alpha) percentile interval of mean(a - b) over users resampled with replacement."""
    a, b = _per_user(a), _per_user(b)
    if a.shape != b.shape:
        raise ValueError(f"a and b must hold the same users: shapes {a.shape} and {b.shape}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    d = a - b
    d = d[np.isfinite(d)]
    n = len(d)
    if n == 0:
        nan = float("nan")
        return BootstrapResult(nan, nan, nan, 0, int(n_boot), int(seed), float(alpha), nan)
    rng = np.random.default_rng(seed)
    p = np.full(n, 1.0 / n)
    means = np.empty(n_boot, dtype=np.float64)
    for s in range(0, n_boot, CHUNK):
        m = min(CHUNK, n_boot - s)
        counts = rng.multinomial(n, p, size=m).astype(np.float64)  # (m, n): how often each user is drawn
        means[s : s + m] = counts @ d / n
    if np.ptp(d) == 0:  # every difference equal: every resampled mean is that value (no rounding noise)
        means[:] = d[0]
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return BootstrapResult(
        diff=float(d.mean()),
        low=float(low),
        high=float(high),
        n_users=n,
        n_boot=int(n_boot),
        seed=int(seed),
        alpha=float(alpha),
        prob_positive=float((means > 0).mean()),
    )


def align_users(
    users_a: np.ndarray, values_a: np.ndarray, users_b: np.ndarray, values_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The users both arrays hold, and each array's values for them (last axis = users), sorted by user id."""
    users_a, users_b = np.asarray(users_a), np.asarray(users_b)
    common, ia, ib = np.intersect1d(users_a, users_b, assume_unique=True, return_indices=True)
    return common, np.asarray(values_a)[..., ia], np.asarray(values_b)[..., ib]
