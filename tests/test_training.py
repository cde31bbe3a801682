"""The shared training loop, its sampler and loss, checkpoints and exact resume (on synthetic data)."""

from __future__ import annotations

import io
import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rich.console import Console

import sparcode_cli.models as models
from sparcode_cli.config import load_config
from sparcode_cli.data.dataset import Ragged
from sparcode_cli.errors import UserError
from sparcode_cli.models import load_checkpoint, model_from_checkpoint
from sparcode_cli.models.base import TrainOutput
from sparcode_cli.models.two_tower import TwoTower
from sparcode_cli.training.sampler import Sampler
from sparcode_cli.training.trainer import TrainingDiverged, sampled_softmax_loss, train
from tests.cli import exit_code
from tests.synthetic import checkerboard, write_csv

SMALL = [
    "model.dim=16",
    "model.emb_dim=16",
    "model.hidden=32",
    "model.max_history=8",
    "train.batch_size=64",
    "train.n_negatives=32",
    "train.lr=0.01",
    "train.threads=1",
    "train.epochs=3",
]


def small_cfg(*extra: str, model: str = "two-tower") -> dict[str, Any]:
    return load_config(model, overrides=[*SMALL, *extra])


def quiet_train(ds: Any, cfg: dict[str, Any], out: Path, **kw: Any) -> Any:
    return train(ds, cfg, out, console=Console(file=io.StringIO()), progress=False, **kw)


@pytest.fixture(scope="module")
def ds() -> Any:
    return checkerboard()


# -- sampler and loss ------------------------------------------------------------------------------------


def test_ordered_samples_are_previous_items_then_next() -> None:
    train_rows = Ragged.from_lists([[], [5, 6, 7, 8], [9, 3]])
    s = Sampler(train_rows, np.zeros((3, 3), np.int64), 10, ordered=True, max_history=2, batch_size=100)
    assert s.n_samples == 3 + 1
    b = s.batch(0, 0)
    got = sorted(zip(b.pos.tolist(), map(tuple, b.query.history.tolist()), strict=True))
    assert got == [(3, (0, 9)), (6, (0, 5)), (7, (5, 6)), (8, (6, 7))]


def test_unordered_history_is_other_items_of_the_user() -> None:
    rows = [[], list(range(1, 31)), [40, 41]]
    s = Sampler(
        Ragged.from_lists(rows), np.zeros((3, 3), np.int64), 50, ordered=False, max_history=5, batch_size=8
    )
    for bi in range(s.batches_per_epoch()):
        b = s.batch(0, bi)
        for p, h in zip(b.pos.tolist(), b.query.history.tolist(), strict=True):
            user = 1 if p <= 30 else 2
            real = [x for x in h if x > 0]
            assert p not in real and len(set(real)) == len(real)
            assert set(real) <= set(rows[user]) and len(real) == min(5, len(rows[user]) - 1)
            assert h[: 5 - len(real)] == [0] * (5 - len(real))  # left-padded
    again = s.batch(0, 1)
    assert torch.equal(again.query.history, s.batch(0, 1).query.history)  # pure function of (epoch, batch)


def test_every_sample_carries_its_user_id() -> None:
    train_rows = Ragged.from_lists([[], [5, 6, 7], [9, 3], [4, 8, 2]])
    for ordered in (True, False):
        s = Sampler(train_rows, np.zeros((4, 3), np.int64), 10, ordered=ordered, max_history=2, batch_size=3)
        for bi in range(s.batches_per_epoch()):
            b = s.batch(0, bi)
            assert b.query.users is not None
            for p, u in zip(b.pos.tolist(), b.query.users.tolist(), strict=True):
                assert p in train_rows.row(u)


def test_negatives_and_logq() -> None:
    train_rows = Ragged.from_lists([[], [1, 2, 2, 2], [3, 1]])  # positives (t >= 1): 2, 2, 2, 1
    kw = dict(ordered=True, max_history=3, batch_size=4, n_negatives=6, seed=0)
    feats = np.zeros((3, 3), np.int64)
    uni = Sampler(train_rows, feats, 10, negatives="uniform", **kw).batch(0, 0)
    assert uni.neg.shape == (6,) and ((uni.neg >= 1) & (uni.neg <= 10)).all()
    np.testing.assert_allclose(uni.log_q.numpy(), math.log(6 / 10), rtol=1e-6)
    inb = Sampler(train_rows, feats, 10, negatives="in-batch", **kw).batch(0, 0)
    assert torch.equal(inb.neg, inb.pos)
    p = {2: 3 / 4, 1: 1 / 4}
    np.testing.assert_allclose(inb.log_q.numpy(), [math.log(4 * p[int(i)]) for i in inb.neg], rtol=1e-6)
    mix = Sampler(train_rows, feats, 10, negatives="mixed", **kw).batch(0, 0)
    assert mix.neg.shape == (6,) and torch.equal(mix.neg[3:], mix.pos[:3])
    exp = [math.log(3 / 10 + 3 * p.get(int(i), 0.0)) for i in mix.neg]
    np.testing.assert_allclose(mix.log_q.numpy(), exp, rtol=1e-6)
    off = Sampler(train_rows, feats, 10, negatives="mixed", logq=False, **kw).batch(0, 0)
    assert (off.log_q == 0).all()


def test_loss_masks_accidental_hits_and_applies_logq() -> None:
    pos = torch.tensor([1, 2])
    neg = torch.tensor([2, 3, 1])
    pos_logits = torch.tensor([1.0, 2.0])
    neg_logits = torch.tensor([[0.5, 0.0, 9.0], [9.0, 1.0, -1.0]])  # 9.0 = the row's own positive
    log_q = torch.tensor([0.0, math.log(2.0), 0.0])
    loss = sampled_softmax_loss(TrainOutput(pos_logits, neg_logits, torch.tensor(0.0)), pos, neg, log_q)
    row0 = -1.0 + math.log(math.exp(1.0) + math.exp(0.5) + math.exp(0.0 - math.log(2.0)))
    row1 = -2.0 + math.log(math.exp(2.0) + math.exp(1.0 - math.log(2.0)) + math.exp(-1.0))
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


# -- the loop --------------------------------------------------------------------------------------------


def test_loss_decreases_and_run_folder(ds: Any, tmp_path: Path) -> None:
    res = quiet_train(ds, small_cfg("train.epochs=4", "train.patience=0"), tmp_path)
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < losses[0] * 0.9
    run = res.run_dir
    for name in ("config.toml", "meta.json", "train.log", "metrics.jsonl", "checkpoint_best.pt",
                 "checkpoint_last.pt", "results.json", "results_per_user.npz"):  # fmt: skip
        assert (run / name).is_file(), name
    meta = json.loads((run / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["data_hash"] == ds.data_hash and "torch" in meta["versions"]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and "recall@20" in json.loads(lines[-1])["valid"]
    results = json.loads((run / "results.json").read_text())
    assert results["test"]["n_users"] == ds.n_users and 0 <= results["test"]["recall@20"] <= 1
    with np.load(run / "results_per_user.npz", allow_pickle=False) as z:
        assert z["test.recall@20"].shape == (ds.n_users,)
    assert run.name == res.run_id and res.run_id.startswith("two-tower-checkerboard-")


def test_checkpoint_loads_weights_only(ds: Any, tmp_path: Path) -> None:
    res = quiet_train(ds, small_cfg("train.epochs=1"), tmp_path)
    raw = torch.load(res.run_dir / "checkpoint_last.pt", weights_only=True)
    assert raw["model"] == "two-tower" and raw["config"]["model"]["dim"] == 16 and raw["step"] > 0
    assert {"torch", "numpy", "python"} <= set(raw["rng"]) and raw["optimizer"] is not None
    model = model_from_checkpoint(load_checkpoint(res.run_dir))
    q = next(iter([_query(ds)]))
    with torch.inference_mode():
        s = model.score_all(q)
        emb = model.encode_queries(q) @ model.item_embeddings().T
    assert s.shape == (4, ds.n_items + 1) and torch.isinf(s[:, 0]).all()
    torch.testing.assert_close(s[:, 1:], emb[:, 1:])


def _query(ds: Any) -> Any:
    from sparcode_cli.data.queries import last_items, query_batch

    rows = np.arange(4)
    return query_batch(last_items(ds.valid.query, rows, 8), ds.features.user_feats[ds.valid.users[rows]])


def _state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint_last.pt", weights_only=True)["state_dict"]


def _results(run: Path) -> dict[str, Any]:
    r = json.loads((run / "results.json").read_text())
    return {"valid": r["valid"], "test": r["test"], "best_epoch": r["best_epoch"], "steps": r["steps"]}


def test_seed_repeatability(ds: Any, tmp_path: Path) -> None:
    cfg = small_cfg("train.epochs=2")
    a = quiet_train(ds, cfg, tmp_path / "a")
    b = quiet_train(ds, cfg, tmp_path / "b")
    assert _results(a.run_dir) == _results(b.run_dir)
    for k, v in _state(a.run_dir).items():
        assert torch.equal(v, _state(b.run_dir)[k]), k
    c = quiet_train(ds, small_cfg("train.epochs=2", "train.seed=1"), tmp_path / "c")
    assert c.run_id != a.run_id
    assert not torch.equal(
        _state(a.run_dir)["item_encoder.id_emb.weight"], _state(c.run_dir)["item_encoder.id_emb.weight"]
    )


def test_stop_and_resume_equals_uninterrupted(ds: Any, tmp_path: Path) -> None:
    cfg = small_cfg("train.epochs=3", "model.dropout=0.2", "train.negatives=mixed")  # dropout: torch RNG
    full = quiet_train(ds, cfg, tmp_path / "full")
    part = quiet_train(ds, cfg, tmp_path / "part", stop_at_step=25)  # mid-epoch 2 (18 batches/epoch)
    assert part.status == "stopped" and part.steps == 25
    with pytest.raises(UserError, match="already exists"):
        quiet_train(ds, cfg, tmp_path / "part")
    done = quiet_train(ds, cfg, tmp_path / "part", resume=True)
    assert done.status == full.status and done.steps == full.steps == 54
    assert _results(done.run_dir) == _results(full.run_dir)
    for k, v in _state(full.run_dir).items():
        assert torch.equal(v, _state(done.run_dir)[k]), k
    hist = [json.loads(x) for x in (done.run_dir / "metrics.jsonl").read_text().splitlines()]
    full_hist = [json.loads(x) for x in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["loss"] for h in hist] == [h["loss"] for h in full_hist]


def test_max_steps_budget_evaluates_partial_epoch(ds: Any, tmp_path: Path) -> None:
    res = quiet_train(ds, small_cfg("train.max_steps=10"), tmp_path)
    assert res.status == "max-steps" and res.steps == 10 and res.history[-1]["partial_epoch"]
    assert res.test is not None and (res.run_dir / "checkpoint_best.pt").is_file()


def test_max_steps_at_an_epoch_end_logs_no_empty_epoch(ds: Any, tmp_path: Path) -> None:
    first = quiet_train(ds, small_cfg("train.max_steps=1000", "train.epochs=1"), tmp_path / "a")
    per_epoch = first.steps  # one full epoch
    res = quiet_train(ds, small_cfg(f"train.max_steps={2 * per_epoch}"), tmp_path / "b")
    assert res.status == "max-steps" and res.steps == 2 * per_epoch
    assert [row["samples"] > 0 for row in res.history] == [True, True]
    assert not any(row.get("partial_epoch") for row in res.history)


class NanTwoTower(TwoTower):
    def train_output(self, q, pos, neg):  # noqa: ANN001, ANN201
        out = super().train_output(q, pos, neg)
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls >= 3:
            out.pos_logits = out.pos_logits * float("nan")
        return out


class SigintTwoTower(TwoTower):
    def after_step(self) -> None:
        self.steps = getattr(self, "steps", 0) + 1
        if self.steps == 5:
            os.kill(os.getpid(), signal.SIGINT)


def _patched(monkeypatch: pytest.MonkeyPatch, cls: type) -> dict[str, Any]:
    monkeypatch.setitem(models.MODELS, "patched", f"{__name__}:{cls.__name__}")
    cfg = small_cfg()
    cfg["model"]["name"] = "patched"
    return cfg


def test_nan_loss_stops_with_message(ds: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TrainingDiverged, match=r"loss is nan at epoch 1, step 3") as exc:
        quiet_train(ds, _patched(monkeypatch, NanTwoTower), tmp_path)
    assert isinstance(exc.value, UserError) and "train.lr" in str(exc.value)


def test_ctrl_c_saves_last_checkpoint(ds: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _patched(monkeypatch, SigintTwoTower)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup / a background job
    res = quiet_train(ds, cfg, tmp_path)
    assert res.status == "interrupted" and res.steps == 5
    ck = torch.load(res.run_dir / "checkpoint_last.pt", weights_only=True)
    assert ck["step"] == 5 and ck["batch"] == 5 and ck["status"] == "interrupted"
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler restored


@pytest.mark.parametrize("encoder", ["sasrec", "gru4rec"])
def test_order_aware_encoders_refuse_unordered_data(tmp_path: Path, encoder: str) -> None:
    unordered = checkerboard(ordered=False)
    for model in ("two-tower", "sparcode"):
        with pytest.raises(UserError, match=rf"query_encoder = '{encoder}' reads the order.*unordered"):
            quiet_train(unordered, small_cfg(f"model.query_encoder={encoder}", model=model), tmp_path)
    assert not any(tmp_path.iterdir())  # refused before the run folder exists
    res = quiet_train(unordered, small_cfg("train.epochs=1"), tmp_path)  # dnn works on unordered data
    assert res.test is not None


def test_cli_gru4rec_on_unordered_data_is_one_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CSV without timestamps is unordered: exit 2 and one line naming the encoder, nothing written."""
    csv = write_csv(checkerboard(), tmp_path / "board.csv", timestamps=False)
    out = tmp_path / "runs"
    args = ["train", "--dataset", str(csv), "--model", "two-tower", "--out", str(out), "--no-progress"]
    args += [f"--set={s}" for s in SMALL] + ["--set", "model.query_encoder=gru4rec"]
    assert _cli(args) == 2
    err = capsys.readouterr().err
    assert "model.query_encoder = 'gru4rec' reads the order of the history" in err and "unordered" in err
    assert "Traceback" not in err and err.count("unordered") == 1
    assert not out.exists() or not any(out.iterdir())


def test_popularity_fits_without_loop(ds: Any, tmp_path: Path) -> None:
    res = quiet_train(ds, load_config("popularity"), tmp_path)
    assert res.status == "fitted" and res.steps == 0 and res.test is not None
    ck = torch.load(res.run_dir / "checkpoint_best.pt", weights_only=True)
    np.testing.assert_array_equal(ck["state_dict"]["counts"].numpy(), ds.item_counts())


def test_init_from_calls_model_hook(ds: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = quiet_train(ds, small_cfg("train.epochs=1"), tmp_path / "base")
    seen: list[str] = []
    monkeypatch.setattr(
        TwoTower, "init_from_run", lambda self, ck, queries=None: seen.append(ck["run_id"]), raising=False
    )
    res = quiet_train(ds, small_cfg("train.epochs=1"), tmp_path / "warm", init_from=base.run_dir)
    assert seen == [base.run_id] and res.run_id != base.run_id  # warm start is part of the identity
    assert json.loads((res.run_dir / "meta.json").read_text())["init_from"] == str(base.run_dir)


def test_warm_start_is_kept_when_training_does_worse(
    ds: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The warm start is validated at epoch 0 and selected like any epoch: if every step makes the model worse
    on validation, the run hands back its start (same weights, same validation metrics)."""
    base = quiet_train(ds, small_cfg("train.epochs=2"), tmp_path / "base")
    base_state = torch.load(base.run_dir / "checkpoint_best.pt", weights_only=True)["state_dict"]

    def load(self: Any, ck: dict[str, Any], queries: Any = None) -> None:
        assert sum(len(q) for q in queries) == int((ds.train.lengths() > 0).sum())  # every training user
        self.load_state_dict(ck["state_dict"])

    def scramble(self: Any) -> None:  # every step wrecks the weights
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn_like(p))

    monkeypatch.setattr(TwoTower, "init_from_run", load, raising=False)
    monkeypatch.setattr(TwoTower, "after_step", scramble)
    res = quiet_train(
        ds, small_cfg("train.epochs=2", "train.patience=5"), tmp_path / "warm", init_from=base.run_dir
    )
    assert res.best_epoch == 0 and res.steps > 0
    assert res.valid is not None and base.valid is not None
    assert res.valid["recall@20"] == base.valid["recall@20"] and res.valid["ndcg@20"] == base.valid["ndcg@20"]
    best = torch.load(res.run_dir / "checkpoint_best.pt", weights_only=True)["state_dict"]
    for k, v in base_state.items():
        torch.testing.assert_close(best[k], v, rtol=0, atol=0)
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["epoch"] == 0 and rows[0]["step"] == 0 and "valid" in rows[0]
    assert all(r["valid"]["recall@20"] < rows[0]["valid"]["recall@20"] for r in rows[1:])


def test_no_checkpoint_is_selected_while_the_model_says_not_yet(
    ds: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SparCode's density warm-up: evaluations before `selectable()` neither select nor count for patience."""
    per_epoch = quiet_train(ds, small_cfg("train.epochs=1"), tmp_path / "probe").steps
    ready_at = 2 * per_epoch
    monkeypatch.setattr(TwoTower, "selectable", lambda self: self._steps_seen >= ready_at, raising=False)
    monkeypatch.setattr(TwoTower, "_steps_seen", 0, raising=False)

    def count(self: Any) -> None:
        self._steps_seen += 1

    monkeypatch.setattr(TwoTower, "after_step", count)
    res = quiet_train(ds, small_cfg("train.epochs=4", "train.patience=1"), tmp_path / "run")
    hist = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(hist) == 4 or res.status == "early-stopped"
    assert res.best_epoch >= 2  # epochs 1 and 2 end before the model is selectable
    assert len(hist) >= 3  # and did not use up the patience of 1


# -- the command -----------------------------------------------------------------------------------------


_cli = exit_code


@pytest.mark.e2e
def test_cli_train_on_own_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = write_csv(checkerboard(), tmp_path / "board.csv")
    out = tmp_path / "runs"
    args = ["train", "--dataset", str(csv), "--model", "two-tower", "--out", str(out), "--no-progress"]
    args += [f"--set={s}" for s in SMALL] + ["--set", "train.epochs=2"]
    assert _cli(args) == 0
    printed = capsys.readouterr()
    assert "recall@20" in printed.out and "test" in printed.out
    (run,) = out.iterdir()
    assert run.name.startswith("two-tower-board-") and (run / "results.json").is_file()
    assert _cli(args) == 2  # exists: needs --resume
    assert "--resume" in capsys.readouterr().err
    assert _cli([*args, "--resume"]) == 0
    assert _cli([*args, "--set", "train.lrr=1"]) == 2
    assert "valid keys in section train" in capsys.readouterr().err


# -- provenance: one writer per run folder, no resume across codes ---------------------------------------


def test_a_run_folder_in_use_is_refused_by_name(ds: Any, tmp_path: Path) -> None:
    from sparcode_cli.atomic import exclusive_lock
    from sparcode_cli.config import run_id

    cfg = small_cfg("train.epochs=1")
    run_dir = tmp_path / run_id(cfg, ds.name, ds.data_hash)
    with exclusive_lock(run_dir, "test holder"):  # another `sparcode train` of the same run id, still running
        with pytest.raises(UserError, match=rf"run folder .*{run_dir.name} is in use by pid {os.getpid()}"):
            quiet_train(ds, cfg, tmp_path)
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing of the refused run written
    assert quiet_train(ds, cfg, tmp_path).status in ("finished", "early-stopped")  # released: it runs


def test_runs_of_other_code_are_stale_never_resumed_or_reused(
    ds: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sparcode_cli.training import trainer

    cfg = small_cfg("train.epochs=2")
    part = quiet_train(ds, cfg, tmp_path, stop_at_step=5, final_eval=False)
    meta = json.loads((part.run_dir / "meta.json").read_text())
    assert meta["code_digest"] == trainer.code_digest() and "content_digest" in meta
    assert trainer.run_state(part.run_dir) == "partial"
    monkeypatch.setattr(trainer, "code_digest", lambda: "another-code")
    assert trainer.run_state(part.run_dir) == "stale"
    with pytest.raises(UserError, match="started by other code"):
        quiet_train(ds, cfg, tmp_path, resume=True)
    moved = trainer.set_aside(part.run_dir)
    assert not part.run_dir.exists() and (moved / "checkpoint_last.pt").is_file()
    assert moved.parent == tmp_path / "stale" and moved.name == f"{part.run_id}-{meta['code_digest']}"
    fresh = quiet_train(ds, cfg, tmp_path)
    assert fresh.run_id == part.run_id and trainer.run_state(fresh.run_dir) == "finished"


def test_a_user_id_run_trains_evaluates_and_warm_starts_sparcode(ds: Any, tmp_path: Path) -> None:
    from sparcode_cli.metrics import evaluate

    res = quiet_train(ds, small_cfg("train.epochs=2", "model.user_id=true"), tmp_path / "tt")
    ck = load_checkpoint(res.run_dir / "checkpoint_best.pt")
    model = model_from_checkpoint(ck)
    weight = model.query_encoder.user.id_emb.weight
    assert weight.shape == (ds.n_users + 1, 16) and not torch.allclose(
        weight[1:], torch.zeros_like(weight[1:])
    )
    again = evaluate(
        model, ds, "test"
    ).summary  # evaluation hands the model the same user ids as training did
    assert again["recall@20"] == res.test["recall@20"] and again["ndcg@20"] == res.test["ndcg@20"]
    sc = quiet_train(
        ds,
        small_cfg("train.epochs=1", "model.user_id=true", "model.token_dim=16", model="sparcode"),
        tmp_path / "sc",
        init_from=res.run_dir,
    )
    sc_weight = torch.load(sc.run_dir / "checkpoint_best.pt", weights_only=True)["state_dict"]
    assert "query_encoder.user.id_emb.weight" in sc_weight
    with pytest.raises(UserError, match=r"user_id = True, this model False"):
        quiet_train(
            ds,
            small_cfg("train.epochs=1", "model.token_dim=16", model="sparcode"),
            tmp_path / "x",
            init_from=res.run_dir,
        )
