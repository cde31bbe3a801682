"""The interaction g (models/interaction.py) and the exactness of SparCode's code x item table."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparcode_cli.config import load_config
from sparcode_cli.data.queries import last_items, query_batch
from sparcode_cli.errors import UserError
from sparcode_cli.models import attach_features, build_model
from sparcode_cli.models.base import DataContext
from sparcode_cli.models.interaction import Interaction
from sparcode_cli.training.sampler import Sampler
from tests.synthetic import checkerboard

SMALL = ["model.dim=16", "model.emb_dim=16", "model.hidden=32", "model.max_history=8", "model.token_dim=8", "model.dropout=0.0",
         "model.interaction_hidden=16"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(name: str, *extra: str) -> Any:
    ds = checkerboard()
    torch.manual_seed(0)
    cfg = load_config(name, overrides=[*SMALL, *extra])
    model = build_model(name, cfg["model"], DataContext.from_dataset(ds))
    attach_features(model, ds.features)
    return model, ds


def concat_mlp_reference(g: Interaction, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """h as the unsplit MLP on [z; t_j] per (code, item, j), summed over j, plus the dot path."""
    first = torch.nn.Linear(2 * g.dim, g.hidden)
    with torch.no_grad():
        first.weight.copy_(torch.cat([g.code_proj.weight, g.item_proj.weight], dim=1))
        first.bias.copy_(g.item_proj.bias)
    c, n, k = z.shape[0], t.shape[0], t.shape[1]
    pairs = torch.cat([z[:, None, None, :].expand(c, n, k, -1), t[None].expand(c, n, k, -1)], dim=-1)
    x = F.relu(first(pairs))
    for layer in g.deep:
        x = F.relu(layer(x))
    h = g.out(x).squeeze(-1).sum(-1)
    return h + torch.einsum("cd,nkd->cn", z, t) / g.tau


@pytest.mark.parametrize("layers", [1, 2])
def test_split_first_layer_equals_the_concatenation_mlp(layers: int) -> None:
    torch.manual_seed(0)
    g = Interaction(6, "mlp", 12, layers, tau=0.5)
    torch.nn.init.normal_(g.out.weight)
    z, t = torch.randn(7, 6), torch.randn(11, 3, 6)
    got = g.table(g.code_side(z), g.item_side(t))
    torch.testing.assert_close(got, concat_mlp_reference(g, z, t), rtol=1e-5, atol=1e-5)


def test_attention_matches_its_per_pair_definition() -> None:
    torch.manual_seed(0)
    g = Interaction(6, "attention", 12, 1, tau=0.5)
    torch.nn.init.normal_(g.out.weight)
    z, t = torch.randn(5, 6), torch.randn(9, 2, 6)
    got = g.table(g.code_side(z), g.item_side(t))
    for c in range(5):
        for i in range(9):
            q = g.code_proj(z[c]) / np.sqrt(12)
            alpha = (g.item_proj(t[i]) @ q).softmax(0)
            o = alpha @ g.value_proj(t[i])
            ref = g.out(F.relu(o + g.code_skip(z[c]))).squeeze() + (z[c] * t[i].sum(0)).sum() / g.tau
            torch.testing.assert_close(got[c, i], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, layers", [("mlp", 1), ("mlp", 2), ("attention", 1)])
def test_table_in_chunks_equals_per_pair(kind: str, layers: int) -> None:
    torch.manual_seed(0)
    g = Interaction(8, kind, 16, layers, tau=0.2)
    torch.nn.init.normal_(g.out.weight)
    z, t = torch.randn(23, 8), torch.randn(31, 2, 8)
    side = g.item_side(t)
    full = g.table(g.code_side(z), side)
    torch.testing.assert_close(g.table_chunked(z, side, max_elems=200), full)
    # paired: code rows (B, K) against one item per row, what training uses for the positives
    items = torch.randint(31, (23,))
    paired = g.paired(g.code_side(z).rows(23, 1), side[items])[:, 0]
    torch.testing.assert_close(paired, full[torch.arange(23), items], rtol=1e-5, atol=1e-5)


def test_fused_backward_matches_autograd() -> None:
    torch.manual_seed(0)
    g = Interaction(8, "mlp", 16, 1, tau=0.2)
    torch.nn.init.normal_(g.out.weight)
    z = torch.randn(40, 8, requires_grad=True)
    t = torch.randn(300, 2, 8, requires_grad=True)
    gy = torch.randn(40, 300)
    params = [z, t, *g.parameters()]
    fused = torch.autograd.grad((g.table(g.code_side(z), g.item_side(t)) * gy).sum(), params)
    c, it = g.code_side(z), g.item_side(t)
    ref_out = c.z @ it.tsum.T / g.tau + g._mlp_tail(c.a[:, None, None, :] + it.b.unsqueeze(0))
    ref = torch.autograd.grad((ref_out * gy).sum(), params)
    for a, b in zip(fused, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _queries(ds: Any, n: int = 24) -> Any:
    rows = np.arange(n)
    return query_batch(last_items(ds.valid.query, rows, 8), ds.features.user_feats[ds.valid.users[rows]])


def _train_a_little(model: Any, ds: Any, steps: int = 5) -> None:
    s = Sampler(ds.train, ds.features.user_feats, ds.n_items, ordered=True, max_history=8, batch_size=32,
                negatives="uniform", n_negatives=16)  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model.train()
    for i in range(steps):
        b = s.batch(0, i)
        out = model.train_output(b.query, b.pos, b.neg)
        (out.neg_logits.mean() - out.pos_logits.mean() + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        model.after_step()
    model.eval()


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_score_all_is_the_sum_of_the_users_code_rows(kind: str) -> None:
    model, ds = small_model(
        "sparcode",
        f"model.interaction={kind}",
        "model.target_density=0.1",
        "model.density_warmup=0",
        "model.n_codewords=8",
    )
    _train_a_little(model, ds)
    q = _queries(ds)
    with torch.inference_mode():
        # put the cut inside the users' own rows (a tiny model's users all share a few codes)
        _, side = model._all_items()
        z = model.quantizer.decode(torch.unique(model.codes(q)))
        g = model._normalise_rows(model.interaction.table(model.interaction.code_side(z), side))[:, 1:]
        model.bias.fill_(-float(g.quantile(0.9)))
        scores = model.score_all(q)
        codes = model.codes(q)
        assert codes.shape == (24, model.k_u * model.probes) and int(codes.max()) < model.n_codes
        uniq = torch.unique(codes)
        rows = model.score_codes(uniq)
        assert rows.shape == (len(uniq), ds.n_items + 1) and (rows[:, 0] == 0).all() and (rows >= 0).all()
        expect = torch.zeros_like(scores)
        for u in range(24):
            for c in sorted(codes[u].tolist()):  # ascending code id, as the retrieve kernel adds
                expect[u] += rows[int((uniq == c).nonzero())]
        expect[:, 0] = float("-inf")
        assert torch.equal(scores, expect)  # bit for bit: the index reproduces exact scoring
        assert (scores[:, 1:] > 0).any() and (scores[:, 1:] == 0).any()
        # a code's row does not depend on how the caller chunks code ids
        one_by_one = torch.cat([model.score_codes(uniq[i : i + 1]) for i in range(len(uniq))])
        assert torch.equal(one_by_one, rows)
        # a subset of items gives the same values
        items = torch.tensor([3, 1, 7, 50])
        assert torch.equal(model.score_codes(uniq, items), rows[:, items])
        # the eval-mode row cache: a second pass is served from it, identically; a new bias is never served stale
        assert len(model._row_cache) == len(uniq)
        assert torch.equal(model.score_all(q), scores)
        model.bias.fill_(float(model.bias) + 2.0)
        denser = model.score_all(q)
        model.clear_cache()
        assert (
            torch.equal(denser, model.score_all(q)) and (denser[:, 1:] > 0).sum() > (scores[:, 1:] > 0).sum()
        )


def test_the_row_cache_over_budget_still_serves_every_row_of_the_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch whose new rows overflow the cache keeps the cached rows it reads (it raised KeyError on Gowalla
    with 65,536 codes: the cache was cleared, then read for rows of the same batch)."""
    model, ds = small_model("sparcode", "model.density_warmup=0", "model.n_codewords=8")
    _train_a_little(model, ds)
    row_bytes = (ds.n_items + 1) * 4
    monkeypatch.setattr(model, "ROW_CACHE_BYTES", 4 * row_bytes)
    with torch.inference_mode():
        model._cached_rows(torch.tensor([0, 1, 2]))
        batch = torch.tensor([1, 2, 3, 4])  # two cached rows, two new ones: 5 rows would overflow 4
        rows = model._cached_rows(batch)
        assert torch.equal(rows, model.score_codes(batch))
        assert sorted(model._row_cache) == [1, 2, 3, 4]


def test_all_to_all_score_all_is_the_sum_over_tokens() -> None:
    model, ds = small_model("all-to-all")
    _train_a_little(model, ds)
    q = _queries(ds, 6)
    with torch.inference_mode():
        scores = model.score_all(q)
        z = model.user_tokens(q)
        items = torch.arange(1, ds.n_items + 1)
        side = model.interaction.item_side(model.tokens_of(items))
        for u in range(6):
            expect = model.interaction.table(model.interaction.code_side(z[u]), side).sum(0)
            torch.testing.assert_close(scores[u, 1:], expect, rtol=1e-5, atol=1e-4)
    assert torch.isinf(scores[:, 0]).all()


def _two_tower_ckpt(*extra: str) -> tuple[Any, Any, dict[str, Any]]:
    """(data, two-tower model, its checkpoint dict): a small untrained two-tower of dim 8 to warm-start from."""
    from sparcode_cli.models import make_checkpoint

    ds = checkerboard()
    torch.manual_seed(0)
    tt_keys = [k for k in SMALL if "token_dim" not in k and "interaction" not in k]
    tt_cfg = load_config("two-tower", overrides=[*tt_keys, "model.dim=8", *extra])
    tt = build_model("two-tower", tt_cfg["model"], DataContext.from_dataset(ds))
    attach_features(tt, ds.features)
    return ds, tt, make_checkpoint(tt, {"model": dict(tt.cfg)}, with_rng=False)


def test_warm_start_from_two_tower() -> None:
    ds, tt, ckpt = _two_tower_ckpt()
    sc, _ = small_model(
        "sparcode", "model.dim=8", "model.token_dim=8", "model.n_codewords=8", "model.head_noise=0.05"
    )
    q = _queries(ds, 16)
    sc.train()
    sc.init_from_run(ckpt, [q])  # the trainer gives an iterable of query batches
    assert bool(sc.quantizer.initted) and sc.quantize_after == 0
    # past the density warm-up: cut at the target from the first step, and selectable from epoch 0
    assert sc.selectable() and float(sc.row_density) == pytest.approx(sc.target_density)
    assert sc.training  # the k-means tokens were taken in eval mode (no dropout), the mode is restored
    with torch.no_grad():
        qv = F.normalize(tt.query_encoder(q), dim=-1)
        z = sc.user_tokens(q)  # every token starts as (about) the two-tower query vector
        assert (torch.einsum("bkd,bd->bk", z, qv) > 0.9).all()
        items = torch.arange(1, 20)
        assert (F.cosine_similarity(sc.tokens_of(items)[:, 0], tt.item_encoder(items), dim=-1) > 0.9).all()
    with pytest.raises(Exception, match="two-tower"):
        sc.init_from_run({**ckpt, "model": "sparcode"})
    # zero_cross: h starts at 0, so g is the dot path of the copied towers; all-to-all warm-starts the same way
    for name in ("sparcode", "all-to-all"):
        m, _ = small_model(name, "model.dim=8", "model.token_dim=8", "model.zero_cross=true")
        m.init_from_run(ckpt)
        assert not m.interaction.out.weight.any()
        with torch.no_grad():
            c = m.interaction.code_side(m.user_tokens(q).reshape(-1, 8))
            it = m.interaction.item_side(m.tokens_of(items))
            assert torch.allclose(m.interaction.table(c, it), c.z @ it.tsum.T / m.interaction.tau, atol=1e-5)


def test_head_noise_separates_the_user_tokens() -> None:
    ds, tt, ckpt = _two_tower_ckpt()
    q = _queries(ds, 16)
    spread = {}
    for noise in (0.05, 1.0):
        sc, _ = small_model("sparcode", "model.dim=8", "model.token_dim=8", f"model.head_noise={noise}")
        sc.init_from_run(ckpt)
        with torch.no_grad():
            z = sc.user_tokens(q)
            qv = F.normalize(tt.query_encoder(q), dim=-1)
        spread[noise] = float(1 - torch.einsum("bkd,bjd->bkj", z, z).mean())
        assert torch.einsum("bkd,bd->bk", z, qv).mean() > 0.5  # still about the two-tower vector
    assert spread[1.0] > 10 * spread[0.05]


def test_warm_start_across_dropout_settings() -> None:
    """Parameter names do not depend on dropout, so a two-tower trained with it warm-starts one without."""
    ds, tt, ckpt = _two_tower_ckpt("model.dropout=0.2")
    sc, _ = small_model(
        "sparcode", "model.dim=8", "model.token_dim=8", "model.n_codewords=8", "model.dropout=0.0"
    )
    sc.init_from_run(ckpt, _queries(ds, 16))
    for name, p in tt.query_encoder.state_dict().items():
        assert torch.equal(sc.query_encoder.state_dict()[name], p), name


@pytest.mark.parametrize("name", ["sparcode", "all-to-all"])
def test_warm_start_from_a_gru4rec_two_tower(name: str) -> None:
    """The GRU and the rest of the gru4rec encoder are copied by name; the warm model encodes as the two-tower."""
    ds, tt, ckpt = _two_tower_ckpt("model.query_encoder=gru4rec")
    assert any(k.startswith("query_encoder.gru.") for k in ckpt["state_dict"])
    m, _ = small_model(name, "model.dim=8", "model.token_dim=8", "model.query_encoder=gru4rec")
    m.init_from_run(ckpt)
    for k, p in tt.query_encoder.state_dict().items():
        assert torch.equal(m.query_encoder.state_dict()[k], p), k
    q = _queries(ds, 16)
    tt.eval()
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m.query_encoder(q), tt.query_encoder(q))
    # a different encoder, or a GRU of another depth, is refused by name (not a state-dict error)
    other, _ = small_model(name, "model.dim=8", "model.token_dim=8", "model.query_encoder=sasrec")
    with pytest.raises(UserError, match="query_encoder = 'gru4rec'"):
        other.init_from_run(ckpt)
    deeper, _ = small_model(
        name, "model.dim=8", "model.token_dim=8", "model.query_encoder=gru4rec", "model.gru_layers=2"
    )
    with pytest.raises(UserError, match=r"(?s)gru_layers = 1, this model 2.*--set model.gru_layers=1"):
        deeper.init_from_run(ckpt)
