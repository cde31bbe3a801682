"""SparCode's sparsity: every code row cut at its own quantile (+ b), the density warm-up, the leaky backward for
positives."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from sparcode_cli.config import load_config
from sparcode_cli.errors import UserError
from sparcode_cli.models import attach_features, build_model, model_from_checkpoint
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


def _sampler(ds: Any) -> Sampler:
    return Sampler(ds.train, ds.features.user_feats, ds.n_items, ordered=True, max_history=8, batch_size=32,
                   negatives="uniform", n_negatives=64)  # fmt: skip


def _steps(model: Any, ds: Any, n: int, opt: Any) -> list[float]:
    """Train n steps with the sampled softmax; the measured batch density of each step."""
    s = _sampler(ds)
    model.train()
    dens = []
    for i in range(n):
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
    """Every code row holds exactly round(density x n_items) items, its best ones by g~."""
    model, ds = small_model("sparcode", *EXTRA)
    opt = torch.optim.AdamW(model.parameters(), lr=0.003)
    dens = _steps(model, ds, 20, opt)
    assert all(abs(d - 0.1) < 0.03 for d in dens), dens
    assert model.bias == 0 and float(model.row_density) == pytest.approx(0.1)
    assert not model.bias.requires_grad  # a buffer: the loss never moves b
    stats = model.epoch_stats()
    for key in ("codes_in_use", "perplexity", "distinct_tuples", "restarts", "bias", "row_density"):
        assert key in stats
    assert stats["train_density"] == pytest.approx(0.1, abs=0.03) and stats["probe_density"] > 0
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


@pytest.mark.parametrize(
    ("old_keys", "loads"),
    [
        ({"cut": "row", "row_norm": "standard"}, True),  # the cut there is now
        ({"cut": "global", "row_norm": "center"}, False),
        ({"cut": "row", "row_norm": "center"}, False),
        ({}, False),  # from before either key: the global cut of centred rows
    ],
)
def test_a_checkpoint_saved_while_cut_and_row_norm_existed(old_keys: dict[str, str], loads: bool) -> None:
    """It carries the global cut's flag `bias_initted`: loaded (same scores) if it used the per-row cut of
    standardised rows, else refused with a UserError (exit code 2), never scored with another cut."""
    model, _ = small_model("sparcode", *EXTRA)
    model.eval()
    ckpt = {
        "model": "sparcode",
        "config": {"model": {**model.cfg, **old_keys}},
        "ctx": model.ctx.to_dict(),
        "state_dict": {**model.state_dict(), "bias_initted": torch.tensor(True)},
    }
    if not loads:
        with pytest.raises(UserError, match=r"model\.cut = .* model\.row_norm = "):
            model_from_checkpoint(ckpt)
        return
    loaded = model_from_checkpoint(ckpt)
    codes = torch.arange(model.n_codes)
    with torch.inference_mode():
        assert torch.equal(loaded.score_codes(codes), model.score_codes(codes))
