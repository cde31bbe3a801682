"""One shared test every learned model passes (the `implicit` library's mixin idea), plus popularity's counts.

To add a model: append (name, small overrides, step budget, minimum test Recall@10) to LEARNED_MODELS.
On `checkerboard` (4 user groups x 4 item groups, 100 items) chance Recall@10 is about 0.11 and a model that
learned the groups gets about 10/13 = 0.77 (13 unseen items of the user's group, 2 of them targets).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rich.console import Console

from sparcode_cli.config import load_config
from sparcode_cli.data.queries import last_items, query_batch
from sparcode_cli.metrics import evaluate
from sparcode_cli.models import attach_features, build_model, load_checkpoint, model_from_checkpoint
from sparcode_cli.models.base import DataContext
from sparcode_cli.training.sampler import Sampler
from sparcode_cli.training.trainer import train
from tests.synthetic import checkerboard

COMMON = [
    "train.threads=1",
    "train.batch_size=64",
    "train.n_negatives=32",
    "train.epochs=100",
    "train.patience=0",
]

SPARCODE_SMALL = [
    "model.dim=16",
    "model.emb_dim=16",
    "model.hidden=32",
    "model.max_history=8",
    "model.token_dim=16",
    "model.n_codewords=16",
    "model.interaction_hidden=16",
    "model.target_density=0.3",
    "model.density_warmup=60",
    "train.lr=0.01",
]

# (model, overrides, step budget, minimum test Recall@10)
LEARNED_MODELS: list[tuple[str, list[str], int, float]] = [
    (
        "two-tower",
        ["model.dim=16", "model.emb_dim=16", "model.hidden=32", "model.max_history=8", "train.lr=0.01"],
        150,
        0.5,
    ),
    (
        "two-tower",
        [
            "model.query_encoder=gru4rec",
            "model.dim=16",
            "model.emb_dim=16",
            "model.hidden=32",
            "model.max_history=8",
            "train.lr=0.01",
        ],
        150,
        0.5,
    ),
    # 800 steps: at 500, train.seed 0 stood at test Recall@10 0.457 on an AVX2-only machine (above 0.5 where CI
    # had run before: the float path moves the trajectory); at 800 seeds 0 / 1 / 2 reach 0.750 / 0.773 / 0.812
    ("sparcode", SPARCODE_SMALL, 800, 0.5),
    ("sparcode", ["model.quantizer=residual", *SPARCODE_SMALL], 800, 0.5),
    (
        "all-to-all",
        [
            "model.dim=16",
            "model.emb_dim=16",
            "model.hidden=32",
            "model.max_history=8",
            "model.token_dim=16",
            "model.interaction_hidden=16",
            "train.lr=0.01",
        ],
        150,
        0.5,
    ),  # noqa: E501
]

MODEL_IDS = [
    m[0]
    + ("-residual" if "model.quantizer=residual" in m[1] else "")
    + ("-gru4rec" if "model.query_encoder=gru4rec" in m[1] else "")
    for m in LEARNED_MODELS
]


@pytest.fixture(scope="module")
def board() -> Any:
    return checkerboard()


def _cfg(name: str, overrides: list[str], steps: int) -> dict[str, Any]:
    return load_config(name, overrides=[*COMMON, f"train.max_steps={steps}", *overrides])


@pytest.mark.parametrize(
    "name, overrides, steps, min_recall",
    LEARNED_MODELS,
    ids=MODEL_IDS,
)
def test_learns_checkerboard(board: Any, tmp_path: Path, name: str, overrides: list[str], steps: int,
                             min_recall: float) -> None:  # fmt: skip
    torch.manual_seed(0)
    res = train(
        board, _cfg(name, overrides, steps), tmp_path, console=Console(file=io.StringIO()), progress=False
    )
    assert res.steps == steps
    model = model_from_checkpoint(load_checkpoint(res.run_dir / "checkpoint_best.pt"))
    test = evaluate(model, board, "test", ks=(10,))
    assert test.summary["recall@10"] >= min_recall, test.summary
    assert test.summary["recall@10"] > 3 * 10 / board.n_items


@pytest.mark.parametrize(
    "name, overrides, steps, min_recall",
    LEARNED_MODELS,
    ids=MODEL_IDS,
)
def test_interface(board: Any, name: str, overrides: list[str], steps: int, min_recall: float) -> None:
    cfg = _cfg(name, overrides, steps)
    torch.manual_seed(0)
    model = build_model(name, cfg["model"], DataContext.from_dataset(board))
    attach_features(model, board.features)
    s = Sampler(board.train, board.features.user_feats, board.n_items, ordered=True, max_history=8,
                batch_size=16, negatives="mixed", n_negatives=10)  # fmt: skip
    b = s.batch(0, 0)
    out = model.train_output(b.query, b.pos, b.neg)
    assert out.pos_logits.shape == (16,) and out.neg_logits.shape == (16, 10) and out.aux_loss.ndim == 0
    model.eval()
    rows = np.arange(5)
    q = query_batch(
        last_items(board.valid.query, rows, 8), board.features.user_feats[board.valid.users[rows]]
    )
    with torch.inference_mode():
        scores = model.score_all(q)
        again = model.score_all(q)
    assert scores.shape == (5, board.n_items + 1) and torch.isinf(scores[:, 0]).all()
    assert torch.isfinite(scores[:, 1:]).all()
    torch.testing.assert_close(scores, again)  # scoring never changes the model


def test_popularity_scores_are_training_counts(board: Any, tmp_path: Path) -> None:
    res = train(
        board, load_config("popularity"), tmp_path, console=Console(file=io.StringIO()), progress=False
    )
    model = model_from_checkpoint(load_checkpoint(res.run_dir))
    counts = np.bincount(board.train.values, minlength=board.n_items + 1)
    q = query_batch(np.zeros((2, 3), np.int64), np.zeros((2, 3), np.int64))
    with torch.inference_mode():
        s = model.score_all(q)
    np.testing.assert_array_equal(s[0, 1:].numpy(), counts[1:])
    r = evaluate(model, board, "test", ks=(5,))
    for row in range(3):
        hist = set(board.test.query.row(row).tolist())
        cand = [i for i in range(1, board.n_items + 1) if i not in hist]
        expect = sorted(cand, key=lambda i: (-counts[i], i))[:5]
        assert r.topk[row].tolist() == expect
