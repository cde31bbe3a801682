"""SparCode's sparsity: ReLU(g + b), the bias controller, the leaky backward for positives."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from sparcode_cli.config import load_config
from sparcode_cli.models import attach_features, build_model
from sparcode_cli.models.base import DataContext
from sparcode_cli.models.sparcode import leaky_cut
from sparcode_cli.training.sampler import Sampler
from tests.synthetic import group_table
from tests.test_expressiveness import with_group_features
from tests.test_interaction import SMALL, _queries

pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(name: str, *extra: str) -> Any:
    """A small SparCode on 16 x 16 groups given as features: users and items differ from the start."""
    ds = with_group_features(group_table(n_groups=16, users_per_group=8, items_per_group=8, seed=0))
    torch.manual_seed(0)
    cfg = load_config(name, overrides=[*SMALL, *extra])
    model = build_model(name, cfg["model"], DataContext.from_dataset(ds))
    attach_features(model, ds.features)
    return model, ds


EXTRA = ("model.density_warmup=0", "model.n_codewords=8", "model.target_density=0.1", "model.leak=0.1")
GLOBAL = (*EXTRA, "model.cut=global", "model.row_norm=center")  # one controlled bias b for every code


def _sampler(ds: Any) -> Sampler:
    return Sampler(ds.train, ds.features.user_feats, ds.n_items, ordered=True, max_history=8, batch_size=32,
                   negatives="uniform", n_negatives=64)  # fmt: skip


def _steps(model: Any, ds: Any, n: int, opt: Any, start: int = 0) -> list[float]:
    """Train n steps with the sampled softmax; the measured batch density of each step."""
    s = _sampler(ds)
    model.train()
    dens = []
    for i in range(start, start + n):
        b = s.batch(i // s.batches_per_epoch(), i % s.batches_per_epoch())
        out = model.train_output(b.query, b.pos, b.neg)
        logits = torch.cat([out.pos_logits[:, None], out.neg_logits], 1)
        loss = torch.nn.functional.cross_entropy(logits, torch.zeros(len(b.pos), dtype=torch.long))
        opt.zero_grad()
        (loss + out.aux_loss).backward()
        opt.step()
        dens.append(model._batch_density)
        model.after_step()
    return dens


def test_a_very_negative_bias_makes_every_score_zero() -> None:
    model, ds = small_model("sparcode", *EXTRA)
    model.eval()
    model.bias.fill_(-1e6)
    with torch.inference_mode():
        s = model.score_all(_queries(ds, 8))
        rows = model.score_codes(torch.arange(model.n_codes))
    assert (s[:, 1:] == 0).all() and torch.isinf(s[:, 0]).all()
    assert (rows == 0).all()
    assert model.probe_density() == 0.0


def test_density_falls_as_the_bias_falls() -> None:
    model, ds = small_model("sparcode", *GLOBAL)
    dens = []
    for b in np.linspace(50, -50, 51):
        model.bias.fill_(float(b))
        dens.append(model.probe_density())
    assert dens[0] == 1.0 and dens[-1] == 0.0 and len(set(dens)) > 5
    assert all(a >= b for a, b in zip(dens, dens[1:], strict=False)), dens


def test_controller_moves_density_to_the_target() -> None:
    model, ds = small_model("sparcode", *GLOBAL)
    opt = torch.optim.AdamW(model.parameters(), lr=0.003)
    first = _steps(model, ds, 30, opt)  # the bias starts at the first batch's quantile
    assert abs(first[0] - 0.1) < 0.02
    for shift, start in ((+50.0, 30), (-50.0, 70)):  # knocked far off in either direction ...
        model.bias += shift
        dens = _steps(model, ds, 40, opt, start)
        assert abs(dens[0] - 0.1) >= 0.09  # (far off indeed: all or nothing)
        assert abs(np.mean(dens[-10:]) - 0.1) < 0.04, dens  # ... it comes back
    assert not model.bias.requires_grad  # a buffer: the loss never moves b
    stats = model.epoch_stats()
    for key in ("codes_in_use", "perplexity", "distinct_tuples", "restarts", "bias", "probe_density"):
        assert key in stats
    assert abs(stats["train_density"] - 0.1) < 0.1


def test_density_warmup_starts_dense() -> None:
    model, _ = small_model("sparcode", "model.density_warmup=100", "model.target_density=0.05")
    assert model.current_target() == 1.0
    model.n_steps.fill_(50)
    assert abs(model.current_target() - 0.05**0.5) < 1e-9
    model.n_steps.fill_(1000)
    assert model.current_target() == 0.05


def test_leaky_cut_forward_is_exact_backward_leaks() -> None:
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0], requires_grad=True)
    y = leaky_cut(x, 0.1)
    assert torch.equal(y, torch.relu(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.1, 0.1, 0.1, 1.0, 1.0]))
    x.grad = None
    leaky_cut(x, 0.0).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0]))


def test_leak_anneals_to_zero() -> None:
    model, _ = small_model("sparcode", "model.leak=0.2", "model.leak_steps=10")
    assert model.leak_slope() == 0.2
    model.n_steps.fill_(5)
    assert abs(model.leak_slope() - 0.1) < 1e-9
    model.n_steps.fill_(10)
    assert model.leak_slope() == 0.0


def test_row_cut_keeps_each_rows_best_share() -> None:
    """cut = "row": every code row holds exactly round(density x n_items) items, its best ones by g~."""
    model, ds = small_model("sparcode", *EXTRA)
    opt = torch.optim.AdamW(model.parameters(), lr=0.003)
    dens = _steps(model, ds, 20, opt)
    assert all(abs(d - 0.1) < 0.03 for d in dens), dens
    assert model.bias == 0 and float(model.row_density) == pytest.approx(0.1)
    model.eval()
    keep = round(0.1 * ds.n_items)
    with torch.inference_mode():
        rows = model.score_codes(torch.arange(model.n_codes))
        model.bias.fill_(20.0)  # every pair kept: g~ - theta_c + 20 (rows are standardised)
        raw = model.score_codes(torch.arange(model.n_codes))
    assert ((rows[:, 1:] > 0).sum(1) == keep).all()  # not one row empty, none over
    top = raw[:, 1:].topk(keep, dim=1).indices.sort(1).values
    assert torch.equal(top, (rows[:, 1:] > 0).nonzero()[:, 1].reshape(-1, keep))
    model.bias.fill_(0.0)
    assert model.probe_density() == pytest.approx(0.1, abs=0.03)  # (a sample of codes and items)


def test_row_cut_bias_shifts_every_row() -> None:
    model, _ = small_model("sparcode", *EXTRA)
    model.eval()
    model.row_density.fill_(0.1)
    dens = []
    for b in np.linspace(3, -3, 25):
        model.bias.fill_(float(b))
        dens.append(model.probe_density())
    assert dens[0] > 0.5 and dens[-1] == 0.0 and len(set(dens)) > 5
    assert all(a >= b for a, b in zip(dens, dens[1:], strict=False)), dens


def test_selection_waits_for_the_density_warmup() -> None:
    model, _ = small_model("sparcode", "model.density_warmup=100")
    assert not model.selectable()
    model.n_steps.fill_(100)
    assert model.selectable()
