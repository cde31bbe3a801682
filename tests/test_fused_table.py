"""The compiled inference kernel of the one-hidden-layer cross table against the torch path."""

from __future__ import annotations

import pytest
import torch

from sparcode_cli.models.fused_table import row_cut, split_mlp_table, usable
from sparcode_cli.models.interaction import _split_mlp_forward

TAU = 0.1


def _inputs(c: int, i: int, k: int, h: int, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    a, b, w = torch.randn(c, h, generator=g), torch.randn(i, k, h, generator=g), torch.randn(h, generator=g)
    return a, b, w, torch.randn(c, d, generator=g), torch.randn(i, d, generator=g)


def test_matches_the_torch_path_and_a_plain_loop() -> None:
    a, b, w, z, t = _inputs(37, 600, 2, 8)  # odd sizes: partial code groups, chunks and item blocks
    with torch.inference_mode():
        fused = split_mlp_table(a, b, w, z, t, TAU)
        ref = z @ t.T / TAU + _split_mlp_forward(a, b, w)
    assert fused.shape == (37, 600) and fused.dtype == torch.float32
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-4)
    for c in (5, 35):  # one code of a group of four, one of a chunk's remainder
        i = 123
        by_hand = float(z[c] @ t[i]) / TAU + sum(float(w @ torch.relu(a[c] + b[i, j])) for j in range(2))
        assert abs(float(fused[c, i]) - by_hand) < 1e-3


def test_rows_do_not_depend_on_chunking_or_threads() -> None:
    a, b, w, z, t = _inputs(40, 300, 3, 16, seed=1)
    with torch.inference_mode():
        whole = split_mlp_table(a, b, w, z, t, TAU)
        parts = torch.cat(
            [split_mlp_table(a[s : s + 3], b, w, z[s : s + 3], t, TAU) for s in range(0, 40, 3)]
        )
        n = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = split_mlp_table(a, b, w, z, t, TAU)
        finally:
            torch.set_num_threads(n)
    assert torch.equal(whole, parts) and torch.equal(whole, one)


@pytest.mark.parametrize("density", [0.05, 0.5, 1.0])
def test_row_cut_is_the_standardised_row_quantile_cut(density: float) -> None:
    g = torch.randn(9, 401, generator=torch.Generator().manual_seed(3)) * 3 + 1
    bias = 0.25
    with torch.inference_mode():
        real = g[:, 1:]
        s = real.std(1, keepdim=True) + 1e-6
        gn = (real - real.mean(1, keepdim=True)) / s
        keep = max(1, round(density * 400))
        th = (
            gn.kthvalue(400 - keep, 1, keepdim=True).values
            if keep < 400
            else gn.min(1, keepdim=True).values - 1
        )
        ref = torch.relu(gn - th + bias)
        out = row_cut(g.clone(), density, bias, 1e-6)
    assert torch.all(out[:, 0] == 0)
    torch.testing.assert_close(out[:, 1:], ref, rtol=1e-5, atol=1e-5)
    # without the bias exactly `keep` items per row stay (continuous scores: no ties)
    kept = (row_cut(g.clone(), density, 0.0, 1e-6)[:, 1:] > 0).sum(1)
    assert torch.all(kept == min(keep, 400))


def test_used_only_outside_autograd() -> None:
    a = torch.zeros(2, 3)
    assert not usable(a)  # grad mode on: training keeps the differentiable torch path
    with torch.no_grad():
        assert usable(a) and not usable(a.double())


def test_row_cut_exact_when_the_sample_bound_misses() -> None:
    """The strided sample behind the fast selection sees only the high values here: the bound leaves too few
    candidates and the cut falls back to a full partition, still exact."""
    n = 4000
    row = torch.zeros(n + 1)
    row[1::3] = 10 + torch.arange(len(row[1::3]), dtype=torch.float32)  # every sampled entry high
    row[2::3] = torch.linspace(0, 1, len(row[2::3]))
    g = row.repeat(2, 1)
    with torch.inference_mode():
        out = row_cut(g.clone(), 0.05, 0.0, 1e-6)
    keep = round(0.05 * n)
    assert torch.all((out[:, 1:] > 0).sum(1) == keep)
    theta = g[0, 1:].kthvalue(n - keep).values
    torch.testing.assert_close(out[0, 1:], torch.relu(g[0, 1:] - theta) / (g[0, 1:].std() + 1e-6))


def test_kernels_leave_torch_thread_count_alone() -> None:
    """numba's "omp" layer reset the caller's OpenMP thread count on its first launch, so a 1-thread training
    worker ran torch on every core; the kernels must leave torch at the count it was set to."""
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        z = torch.randn(40, 8)
        g = split_mlp_table(
            torch.randn(40, 4), torch.randn(300, 2, 4), torch.randn(4), z, torch.randn(300, 8), 0.1
        )
        row_cut(g, 0.1, 0.0, 1e-6)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(prev)


def test_odd_sizes_and_a_changed_item_side() -> None:
    """Odd D and K_i x H take the kernel's one-row passes; the item-major copy of the item side is kept between
    calls only while it is the same, unchanged tensor."""
    a, b, w, z, t = _inputs(19, 333, 1, 5, d=7, seed=4)
    with torch.no_grad():
        first = split_mlp_table(a, b, w, z, t, TAU)
        torch.testing.assert_close(first, z @ t.T / TAU + _split_mlp_forward(a, b, w), rtol=1e-5, atol=1e-4)
        b.mul_(2.0)  # in place: the cached copy is stale
        t.add_(1.0)
        again = split_mlp_table(a, b, w, z, t, TAU)
        torch.testing.assert_close(again, z @ t.T / TAU + _split_mlp_forward(a, b, w), rtol=1e-5, atol=1e-4)
        other = split_mlp_table(a, b.clone(), w, z, t, TAU)  # a new tensor with the same values
    assert not torch.equal(first, again) and torch.equal(again, other)
