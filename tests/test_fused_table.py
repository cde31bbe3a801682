"""The compiled inference kernel of the one-hidden-layer cross table against the torch path."""

from __future__ import annotations

import torch

from sparcode_cli.models.fused_table import split_mlp_table, usable
from sparcode_cli.models.interaction import _split_mlp_forward


def _inputs(c: int, i: int, k: int, h: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, h, generator=g), torch.randn(i, k, h, generator=g), torch.randn(h, generator=g)


def test_matches_the_torch_path_and_a_plain_loop() -> None:
    a, b, w = _inputs(37, 600, 2, 8)  # odd sizes: partial code chunks and item blocks
    with torch.inference_mode():
        fused = split_mlp_table(a, b, w)
        ref = _split_mlp_forward(a, b, w)
    assert fused.shape == (37, 600) and fused.dtype == torch.float32
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    c, i = 5, 123
    by_hand = sum(float(w @ torch.relu(a[c] + b[i, j])) for j in range(2))
    assert abs(float(fused[c, i]) - by_hand) < 1e-4


def test_rows_do_not_depend_on_chunking_or_threads() -> None:
    a, b, w = _inputs(40, 300, 3, 16, seed=1)
    with torch.inference_mode():
        whole = split_mlp_table(a, b, w)
        parts = torch.cat([split_mlp_table(a[s : s + 3], b, w) for s in range(0, 40, 3)])
        n = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = split_mlp_table(a, b, w)
        finally:
            torch.set_num_threads(n)
    assert torch.equal(whole, parts) and torch.equal(whole, one)


def test_used_only_outside_autograd() -> None:
    a = torch.zeros(2, 3)
    assert not usable(a)  # grad mode on: training keeps the differentiable torch path
    with torch.no_grad():
        assert usable(a) and not usable(a.double())
