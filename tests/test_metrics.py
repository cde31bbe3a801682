"""Metrics against hand-computed cases; the top-k helper's tie-breaking and masking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sparcode_cli.data.dataset import Ragged
from sparcode_cli.metrics import evaluate, metrics_from_topk, topk
from tests.synthetic import checkerboard

INF = float("-inf")


def test_topk_ties_broken_by_item_id() -> None:
    s = torch.tensor([[INF, 1.0, 3.0, 1.0, 3.0, 2.0, 1.0]])
    items, lengths = topk(s, 4)
    assert items.tolist() == [[2, 4, 5, 1]]
    assert lengths.tolist() == [4]
    items, _ = topk(s, 5)
    assert items.tolist() == [[2, 4, 5, 1, 3]]


def test_topk_many_ties_and_masked_never_returned() -> None:
    s = torch.zeros(2, 10)
    s[:, 0] = INF
    s[1, 3] = INF
    s[1, 7] = 5.0
    items, lengths = topk(s, 3)
    assert items.tolist() == [[1, 2, 3], [7, 1, 2]]
    # fewer finite items than k: a shorter list, -inf items never appear
    s = torch.tensor([[INF, 0.5, INF, INF, 0.1]])
    items, lengths = topk(s, 4)
    assert items.tolist() == [[1, 4, 0, 0]] and lengths.tolist() == [2]


def test_topk_exclude_nonpositive_gives_shorter_lists() -> None:
    s = torch.tensor([[INF, 0.0, 2.0, -1.0, 0.5, 0.0], [INF, 1.0, 1.0, 1.0, 1.0, 1.0]])
    items, lengths = topk(s, 3, exclude_nonpositive=True)
    assert items.tolist() == [[2, 4, 0], [1, 2, 3]]
    assert lengths.tolist() == [2, 3]
    items, lengths = topk(s, 3)
    assert items.tolist() == [[2, 4, 1], [1, 2, 3]]


def test_topk_matches_reference_sort_on_random_ties() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 5, (64, 40), generator=g).float()
    s[torch.rand(64, 40, generator=g) < 0.2] = INF
    items, lengths = topk(s, 7)
    for r in range(64):
        ref = sorted((i for i in range(40) if s[r, i] > INF), key=lambda i: (-s[r, i].item(), i))[:7]
        assert items[r, : len(ref)].tolist() == ref and int(lengths[r]) == len(ref)


def test_metrics_hand_computed() -> None:
    # user 0: 3 targets {1, 2, 9}; list [1, 5, 2] -> hits at ranks 1 and 3
    # user 1: 1 target {7}; list [3, 7, 4] -> hit at rank 2
    top = np.array([[1, 5, 2], [3, 7, 4]])
    targets = Ragged.from_lists([[1, 2, 9], [7]])
    res = metrics_from_topk(top, targets, ks=(2, 3))
    pu = res.per_user
    np.testing.assert_allclose(pu["recall@2"], [1 / 3, 1.0])
    np.testing.assert_allclose(pu["recall@3"], [2 / 3, 1.0])
    np.testing.assert_allclose(pu["precision@2"], [1 / 2, 1 / 2])
    np.testing.assert_allclose(pu["precision@3"], [2 / 3, 1 / 3])
    np.testing.assert_allclose(pu["hitrate@2"], [1.0, 1.0])
    d = [1 / math.log2(i + 2) for i in range(3)]
    # user 0: more targets than K=2 -> IDCG over 2 positions; user 1: fewer targets -> IDCG over 1 position
    np.testing.assert_allclose(pu["ndcg@2"], [d[0] / (d[0] + d[1]), d[1] / d[0]])
    np.testing.assert_allclose(pu["ndcg@3"], [(d[0] + d[2]) / (d[0] + d[1] + d[2]), d[1] / d[0]])
    assert res.summary["recall@2"] == pytest.approx((1 / 3 + 1) / 2)
    assert res.summary["n_users"] == 2


def test_metrics_shorter_lists_and_no_target_user() -> None:
    top = np.array([[4, 0, 0], [1, 2, 3], [5, 6, 0]])
    targets = Ragged.from_lists([[4, 8], [], [9]])
    res = metrics_from_topk(top, targets, ks=(3,))
    assert res.summary["n_users"] == 2  # the user without targets is not averaged
    assert np.isnan(res.per_user["recall@3"][1])
    assert res.summary["recall@3"] == pytest.approx(0.25)
    assert res.summary["precision@3"] == pytest.approx((1 / 3) / 2)  # hits / K even for a short list
    assert res.summary["list_len@3"] == pytest.approx((1 + 2) / 2)


class _FixedScores(torch.nn.Module):
    """score_all returns the same scores for every user: item id i scores `base[i]`."""

    def __init__(self, base: list[float]) -> None:
        super().__init__()
        self.base = torch.tensor(base)
        self.cfg = {"max_history": 2}

    def score_all(self, q):  # noqa: ANN001
        s = self.base.expand(len(q), -1).clone()
        s[:, 0] = INF
        return s


def test_evaluate_masks_whole_history_not_only_last_L() -> None:
    ds = checkerboard(n_user_groups=1, n_item_groups=1, users_per_group=3, items_per_group=14, seq_len=10)
    n = ds.n_items
    model = _FixedScores([0.0] + [float(n - i) for i in range(1, n + 1)])  # best = lowest id
    res = evaluate(model, ds, "valid", ks=(3,), batch_size=2)
    for r in range(3):
        hist = set(ds.valid.query.row(r).tolist())
        expect = [i for i in range(1, n + 1) if i not in hist][:3]
        assert res.topk[r].tolist() == expect  # max_history=2, yet all 10 history items are masked
    exp_recall = np.mean(
        [len(set(res.topk[r]) & set(ds.valid.targets.row(r).tolist())) / 2 for r in range(3)]
    )
    assert res.summary["recall@3"] == pytest.approx(exp_recall)
