"""`model.tower = "embedding"`: towers with no map, each the sum of its embeddings (issue #12, Gowalla)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from sparcode_cli.config import config_hash, load_config
from sparcode_cli.errors import UserError
from sparcode_cli.models import build_model, load_checkpoint
from sparcode_cli.models.base import DataContext, QueryBatch
from sparcode_cli.training.trainer import train
from tests.synthetic import checkerboard

pytestmark = pytest.mark.usefixtures("one_thread")

CTX = DataContext(n_items=30, n_genres=4, n_year_buckets=3, user_vocab=(3, 4, 5), max_genres=2, n_users=6)
SMALL = [
    "model.dim=16",
    "model.emb_dim=16",
    "model.hidden=32",
    "model.max_history=8",
    "train.batch_size=64",
    "train.n_negatives=32",
    "train.lr=0.01",
    "train.threads=1",
]


def cfg_of(model: str, *extra: str) -> dict[str, Any]:
    return load_config(model, overrides=[*SMALL, *extra])


def queries() -> QueryBatch:
    history = torch.tensor([[0, 0, 0, 0, 0, 3, 7, 11], [0, 0, 0, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8]])
    feats = torch.tensor([[1, 2, 3], [0, 0, 0], [2, 1, 4]])
    return QueryBatch(history, feats, torch.tensor([1, 2, 6]))


def test_the_default_tower_keeps_every_run_id() -> None:
    for model in ("two-tower", "sparcode", "all-to-all"):
        cfg = load_config(model)
        assert cfg["model"]["tower"] == "mlp"
        older = {s: {k: v for k, v in cfg[s].items() if (s, k) != ("model", "tower")} for s in cfg}
        assert config_hash(cfg, "d", 0) == config_hash(older, "d", 0)
        changed = load_config(model, overrides=["model.tower=embedding"])
        assert config_hash(changed, "d", 0) != config_hash(cfg, "d", 0)


@pytest.mark.parametrize("model", ["two-tower", "sparcode", "all-to-all"])
def test_an_embedding_tower_needs_dim_equal_to_emb_dim(model: str) -> None:
    with pytest.raises(UserError, match=r'model.dim = 8 is not allowed with model.tower = "embedding"'):
        load_config(model, overrides=["model.tower=embedding", "model.dim=8", "model.emb_dim=16"])
    with pytest.raises(UserError, match="tower"):
        load_config(model, overrides=["model.tower=linear"])


@pytest.mark.parametrize("encoder", ["dnn", "sasrec", "gru4rec"])
def test_an_embedding_tower_has_no_map(encoder: str) -> None:
    cfg = cfg_of("two-tower", "model.tower=embedding", "model.user_id=true", f"model.query_encoder={encoder}")
    model = build_model("two-tower", cfg["model"], CTX)
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if encoder == "dnn":  # nothing but embedding tables
        assert linear == []
        assert all(isinstance(m, torch.nn.Embedding) for m in model.modules() if not list(m.children()))
    else:  # the sequence model's own layers only (attention blocks, GRU): no map after it
        assert all(n.startswith("query_encoder.blocks.") for n in linear)
        assert model.query_encoder.out is None
    assert model.item_encoder.mlp is None
    out = model.encode_queries(queries())
    assert out.shape == (3, 16) and torch.isfinite(out).all()


def test_embedding_tower_scores_are_the_cosine_of_the_summed_embeddings() -> None:
    cfg = cfg_of("two-tower", "model.tower=embedding", "model.user_id=true", "model.temperature=0.2")
    torch.manual_seed(0)
    model = build_model("two-tower", cfg["model"], CTX).eval()
    genres = torch.randint(0, CTX.n_genres, (CTX.n_items + 1, CTX.max_genres))
    genres[:5] = 0  # items without genres: no genre part
    years = torch.randint(0, CTX.n_year_buckets, (CTX.n_items + 1,))
    model.item_encoder.set_features(genres.numpy(), years.numpy())
    q = queries()
    qe, ie = model.query_encoder, model.item_encoder
    mask = (q.history > 0).float().unsqueeze(-1)
    hist = (qe.item_emb(q.history) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    user = qe.user.id_emb(q.users) + sum(qe.user.embs[j](q.user_feats[:, j]) for j in range(3))
    gmask = (genres > 0).float().unsqueeze(-1)
    gmean = (ie.genre_emb(genres) * gmask).sum(1) / gmask.sum(1).clamp(min=1.0)
    items = ie.id_emb.weight + gmean + ie.year_emb(years)
    with torch.no_grad():
        want = F.normalize(hist + user, dim=-1) @ F.normalize(items, dim=-1).T / 0.2
        got = model.score_all(q)
    torch.testing.assert_close(got[:, 1:], want[:, 1:])
    assert torch.isinf(got[:, 0]).all()
    # the user-ID embedding is one of the summed parts: another user, another score
    other = QueryBatch(q.history, q.user_feats, torch.tensor([2, 3, 5]))
    with torch.no_grad():
        assert not torch.allclose(model.score_all(other)[:, 1:], got[:, 1:])


def quiet_train(ds: Any, cfg: dict[str, Any], out: Path, **kw: Any) -> Any:
    return train(ds, cfg, out, console=Console(file=io.StringIO()), progress=False, **kw)


def test_an_embedding_two_tower_trains_and_warm_starts_sparcode_and_all_to_all(tmp_path: Path) -> None:
    ds = checkerboard()
    tower = ["model.tower=embedding", "model.user_id=true"]
    tt = quiet_train(ds, cfg_of("two-tower", *tower, "train.epochs=3"), tmp_path / "tt")
    pop = quiet_train(ds, load_config("popularity"), tmp_path / "pop")
    assert tt.test["recall@20"] > pop.test["recall@20"] + 0.1  # it learns the groups
    ck = load_checkpoint(tt.run_dir / "checkpoint_best.pt")
    assert not any(k.endswith("mlp.0.weight") for k in ck["state_dict"])

    # the warm start copies the encoders as they are
    for name in ("sparcode", "all-to-all"):
        cfg = cfg_of(name, *tower, "model.token_dim=16")
        model = build_model(name, cfg["model"], DataContext.from_dataset(ds))
        model.init_from_run(ck)
        for prefix in ("query_encoder.", "item_encoder."):
            for k, v in model.state_dict().items():
                if k.startswith(prefix):
                    torch.testing.assert_close(v, ck["state_dict"][k])

    for name, token_dim in (("sparcode", 16), ("all-to-all", 8)):
        cfg = cfg_of(name, *tower, f"model.token_dim={token_dim}", "train.epochs=1")
        res = quiet_train(ds, cfg, tmp_path / name, init_from=tt.run_dir)
        assert res.test["recall@20"] > pop.test["recall@20"]
        # tokens narrower than the two-tower's vectors cannot start as them: the log says so and what to set
        dim = cfg["model"]["dim"]
        warned = f"model.token_dim = 8 < model.dim = {dim}: the warm start's tokens keep only the first 8"
        assert (warned in (res.run_dir / "train.log").read_text()) == (token_dim < dim), name
    # an MLP-tower model cannot take the embedding towers' weights: one clear message
    with pytest.raises(UserError, match=r"tower = 'embedding', this model 'mlp'"):
        quiet_train(
            ds,
            cfg_of("sparcode", "model.user_id=true", "model.token_dim=16", "train.epochs=1"),
            tmp_path / "x",
            init_from=tt.run_dir,
        )


def test_history_false_is_matrix_factorisation() -> None:
    cfg = cfg_of("two-tower", "model.tower=embedding", "model.user_id=true", "model.history=false")
    ctx = DataContext(n_items=30, n_genres=0, n_year_buckets=0, user_vocab=(1, 1, 1), max_genres=0, n_users=6)
    torch.manual_seed(0)
    model = build_model("two-tower", cfg["model"], ctx).eval()
    assert model.query_encoder.item_emb is None  # no history table at all
    no_feats = torch.zeros(3, 3, dtype=torch.long)  # this context has no user features
    q = QueryBatch(queries().history, no_feats, queries().users)
    other_history = QueryBatch(torch.flip(q.history, [0]), q.user_feats, q.users)
    with torch.no_grad():
        got = model.score_all(q)
        torch.testing.assert_close(model.score_all(other_history), got)  # the history is not read
        users = F.normalize(model.query_encoder.user.id_emb(q.users), dim=-1)
        items = F.normalize(model.item_encoder.id_emb.weight, dim=-1)
        torch.testing.assert_close(got[:, 1:], (users @ items.T)[:, 1:] / 0.1)
    # the mlp tower without the history: user features and user id only
    mlp_cfg = cfg_of("two-tower", "model.user_id=true", "model.history=false")
    assert build_model("two-tower", mlp_cfg["model"], CTX).query_encoder.mlp[0].in_features == 16 + 3 * 4


@pytest.mark.parametrize(
    "extra", [["model.user_id=false"], ["model.user_id=true", "model.query_encoder=sasrec"]]
)
def test_history_false_needs_the_dnn_encoder_and_a_user_id(extra: list[str]) -> None:
    with pytest.raises(UserError, match="model.history = false is not allowed"):
        load_config("two-tower", overrides=["model.history=false", *extra])


def test_the_default_history_keeps_every_run_id() -> None:
    for model in ("two-tower", "sparcode", "all-to-all"):
        cfg = load_config(model)
        older = {s: {k: v for k, v in cfg[s].items() if (s, k) != ("model", "history")} for s in cfg}
        assert cfg["model"]["history"] is True and config_hash(cfg, "d", 0) == config_hash(older, "d", 0)
