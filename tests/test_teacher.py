"""SparCode's distillation from its warm start's two-tower (`model.distill`, models/teacher.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparcode_cli.config import load_config
from sparcode_cli.models import load_checkpoint, make_checkpoint, model_from_checkpoint
from sparcode_cli.models.sparcode import SparCode
from sparcode_cli.training.sampler import Sampler
from tests.synthetic import checkerboard
from tests.test_interaction import _queries, _train_a_little, _two_tower_ckpt, small_model

KEYS = ("model.dim=8", "model.token_dim=8", "model.n_codewords=8")


def _sampler_batch(ds):  # noqa: ANN001, ANN202
    s = Sampler(ds.train, ds.features.user_feats, ds.n_items, ordered=True, max_history=8, batch_size=32,
                negatives="uniform", n_negatives=16)  # fmt: skip
    return s.batch(0, 0)


def test_the_teacher_scores_as_the_two_tower_it_copies() -> None:
    ds, tt, ckpt = _two_tower_ckpt("model.temperature=0.2")
    sc, _ = small_model("sparcode", *KEYS, "model.distill=1.0")
    sc.init_from_run(ckpt, [_queries(ds, 16)])
    assert sc.teacher is not None and bool(sc.teacher.ready)
    b = _sampler_batch(ds)
    tt.eval()
    with torch.no_grad():
        out = tt.train_output(b.query, b.pos, b.neg)  # the two-tower's own training logits (cos / 0.2)
    got = sc.teacher_logits(b.query, b.pos, b.neg)
    torch.testing.assert_close(got[:, 0], out.pos_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:, 1:], out.neg_logits, rtol=1e-5, atol=1e-5)


def test_the_teacher_stays_frozen_and_in_eval_mode_while_the_student_trains() -> None:
    ds, _, ckpt = _two_tower_ckpt("model.dropout=0.5")
    sc, _ = small_model("sparcode", *KEYS, "model.distill=1.0", "model.dropout=0.5")
    sc.init_from_run(ckpt, [_queries(ds, 16)])
    before = {k: v.clone() for k, v in sc.teacher.state_dict().items()}
    enc_before = [p.clone() for p in sc.query_encoder.parameters()]
    _train_a_little(sc, ds, steps=3)
    sc.train()
    assert (
        sc.training and not sc.teacher.training
    )  # model.train() leaves the teacher in eval mode: no dropout
    b = _sampler_batch(ds)
    assert torch.equal(sc.teacher_logits(b.query, b.pos, b.neg), sc.teacher_logits(b.query, b.pos, b.neg))
    assert all(not p.requires_grad and p.grad is None for p in sc.teacher.parameters())
    for k, v in sc.teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(p, q) for p, q in zip(sc.query_encoder.parameters(), enc_before, strict=True))


def test_the_loss_term_is_zero_when_the_student_ranks_as_the_teacher() -> None:
    teacher = torch.randn(4, 17)
    assert float(SparCode.distill_loss(3.0 * teacher + 1.0, teacher)) == pytest.approx(0.0, abs=1e-5)
    assert float(SparCode.distill_loss(-teacher, teacher)) > 0.1
    dense = torch.randn(4, 17, requires_grad=True)
    SparCode.distill_loss(dense, teacher).backward()
    assert dense.grad is not None and dense.grad.abs().sum() > 0


def test_distill_adds_to_the_aux_loss_and_needs_a_warm_start() -> None:
    ds, _, ckpt = _two_tower_ckpt()
    b = _sampler_batch(ds)
    losses = {}
    for w in (0.0, 2.0):
        torch.manual_seed(0)
        sc, _ = small_model("sparcode", *KEYS, f"model.distill={w}")
        sc.init_from_run(ckpt, [_queries(ds, 16)])
        sc.train()
        torch.manual_seed(1)
        losses[w] = float(sc.train_output(b.query, b.pos, b.neg).aux_loss.detach())
    assert losses[2.0] > losses[0.0]
    # from scratch there is no two-tower to distil from: no term (the trainer warns, test_training.py)
    for w in (0.0, 1.0):
        torch.manual_seed(0)
        cold, _ = small_model("sparcode", *KEYS, f"model.distill={w}")
        assert not cold.has_teacher()
        cold.train()
        torch.manual_seed(1)
        losses[f"cold {w}"] = float(cold.train_output(b.query, b.pos, b.neg).aux_loss.detach())
    assert losses["cold 1.0"] == losses["cold 0.0"]


def test_the_teacher_draws_nothing_from_the_random_stream() -> None:
    """Building the teacher leaves the RNG where it was: with distill on, every other parameter starts as
    with it off (so the two runs differ only by the loss term)."""
    torch.manual_seed(0)
    off, _ = small_model("sparcode", *KEYS, "model.distill=0")
    after_off = torch.rand(3)
    torch.manual_seed(0)
    on, _ = small_model("sparcode", *KEYS, "model.distill=1.0")
    after_on = torch.rand(3)
    assert off.teacher is None and not any(k.startswith("teacher.") for k in off.state_dict())
    shared = off.state_dict()
    for k, v in shared.items():
        assert torch.equal(v, on.state_dict()[k]), k
    assert torch.equal(after_off, after_on)


def test_a_checkpoint_keeps_its_teacher() -> None:
    ds, _, ckpt = _two_tower_ckpt()
    sc, _ = small_model("sparcode", *KEYS, "model.distill=1.0")
    sc.init_from_run(ckpt, [_queries(ds, 16)])
    cfg = load_config("sparcode", overrides=[*KEYS, "model.distill=1.0"])
    back = model_from_checkpoint(make_checkpoint(sc, {**cfg, "model": dict(sc.cfg)}, with_rng=False))
    assert isinstance(back, SparCode) and back.teacher is not None and bool(back.teacher.ready)
    b = _sampler_batch(ds)
    torch.testing.assert_close(
        back.teacher_logits(b.query, b.pos, b.neg), sc.teacher_logits(b.query, b.pos, b.neg)
    )
    with torch.no_grad():
        q = _queries(ds, 8)
        assert torch.equal(back.eval().score_all(q), sc.eval().score_all(q))


def test_a_warm_started_run_distils_and_a_cold_one_says_it_cannot(tmp_path: Path) -> None:
    from tests.test_training import quiet_train, small_cfg

    ds = checkerboard()
    tt = quiet_train(ds, small_cfg("train.epochs=2"), tmp_path / "tt")
    warm = quiet_train(
        ds,
        small_cfg("train.epochs=1", "model.distill=5.0", model="sparcode"),
        tmp_path / "sc",
        init_from=tt.run_dir,
    )
    back = model_from_checkpoint(load_checkpoint(warm.run_dir / "checkpoint_last.pt"))
    assert isinstance(back, SparCode) and back.has_teacher()
    tt_model = model_from_checkpoint(load_checkpoint(tt.run_dir / "checkpoint_best.pt"))
    for k, v in tt_model.query_encoder.state_dict().items():  # the teacher is the two-tower run, untouched
        assert torch.equal(back.teacher.query_encoder.state_dict()[k], v), k
    assert "note: model.distill" not in (warm.run_dir / "train.log").read_text()
    cold = quiet_train(
        ds, small_cfg("train.epochs=1", "model.distill=5.0", model="sparcode"), tmp_path / "cold"
    )
    assert (
        "note: model.distill = 5.0 distils from the two-tower of a warm start"
        in (cold.run_dir / "train.log").read_text()
    )
