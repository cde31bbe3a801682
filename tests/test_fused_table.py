"""The compiled inference kernel of the one-hidden-layer cross table against the torch path."""

from __future__ import annotations

import pytest
import torch

from sparcode_cli.models.fused_table import row_cut, split_mlp_table, split_mlp_table_cut, usable
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


def test_wide_vectors_on_avx512_hosts_only_and_never_over_an_explicit_setting() -> None:
    """numba_runtime asks LLVM for 512-bit vectors where the CPU has AVX-512 (LLVM prefers 256 there); an explicit
    NUMBA_CPU_FEATURES (a portable cache, say) is kept as given."""
    import os
    import subprocess
    import sys

    import llvmlite.binding as ll

    from sparcode_cli import numba_runtime

    host = ll.get_host_cpu_features().flatten()
    wide = numba_runtime.wide_vector_features()
    assert wide == (f"{host},-prefer-256-bit" if "+avx512f" in host.split(",") else None)
    probe = "import numba, sparcode_cli.numba_runtime; print(numba.config.CPU_FEATURES)"
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES")}
    given = subprocess.run(
        [sys.executable, "-c", probe],
        env={**env, "NUMBA_CPU_FEATURES": "+sse2"},
        capture_output=True,
        text=True,
    )
    assert given.stdout.strip() == "+sse2", given.stderr
    default = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert default.stdout.strip() == str(wide), default.stderr


@pytest.mark.parametrize("seed", range(4))
def test_cut_value_is_the_exact_order_statistic_with_ties(seed: int) -> None:
    """The sampled bound + quickselect return the (keep + 1)-th largest value, ties and all."""
    import numpy as np

    from sparcode_cli.models.fused_table import _cut_value, _select

    rng = np.random.default_rng(seed)
    for row in (
        rng.integers(0, 20, size=3001).astype(np.float32),
        rng.standard_normal(2500).astype(np.float32),
    ):
        for keep in (1, 7, 150, len(row) // 2, len(row) - 1):
            assert _cut_value(row.copy(), keep) == np.sort(row)[len(row) - keep - 1]
        for k in (0, 5, len(row) - 1):
            assert _select(row.copy(), len(row), k) == np.sort(row)[k]


def test_table_and_cut_in_one_kernel_equal_the_two_calls() -> None:
    a, b, w, z, t = _inputs(37, 1100, 2, 8, seed=4)  # a partial code group, a partial item block
    with torch.inference_mode():
        for density, bias in ((0.05, 0.0), (0.2, 0.3), (1.0, 0.0)):
            two = row_cut(split_mlp_table(a, b, w, z, t, TAU), density, bias, 1e-6)
            one = split_mlp_table_cut(a, b, w, z, t, TAU, density, bias, 1e-6)
            assert one.shape == (37, 1100) and torch.equal(one, two)
