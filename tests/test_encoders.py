"""The query encoders on their own: what each reads of the history (order, padding) and the registry."""

from __future__ import annotations

import pytest
import torch

from sparcode_cli.config import load_config
from sparcode_cli.models.base import DataContext, QueryBatch
from sparcode_cli.models.encoders import QUERY_ENCODERS, build_query_encoder, is_order_aware

CTX = DataContext(n_items=30, n_genres=3, n_year_buckets=3, user_vocab=(3, 4, 5), max_genres=2, n_users=6)
L = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def encoder(name: str, *extra: str) -> torch.nn.Module:
    cfg = load_config(
        "two-tower",
        overrides=[
            f"model.query_encoder={name}",
            "model.emb_dim=16",
            "model.dim=8",
            f"model.max_history={L}",
            *extra,
        ],
    )
    torch.manual_seed(0)
    return build_query_encoder(cfg["model"], CTX).eval()


def run(enc: torch.nn.Module, history: list[list[int]]) -> torch.Tensor:
    h = torch.tensor(history, dtype=torch.long)
    feats = torch.tensor([[1, 2, 3]] * len(history), dtype=torch.long)
    with torch.no_grad():
        return enc(QueryBatch(h, feats))


def left_pad(items: list[int], length: int = L) -> list[int]:
    return [0] * (length - len(items)) + items


def test_the_registry_says_which_encoders_read_order() -> None:
    assert {n for n in QUERY_ENCODERS if is_order_aware(n)} == {"sasrec", "gru4rec"}
    assert not is_order_aware("dnn") and not is_order_aware("no-such-encoder")


@pytest.mark.parametrize("name", ["sasrec", "gru4rec"])
def test_order_aware_encoders_read_the_order(name: str) -> None:
    enc = encoder(name)
    out = run(enc, [left_pad([3, 7, 11, 19]), left_pad([19, 11, 7, 3]), left_pad([7, 3, 19, 11])])
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1], atol=1e-5) and not torch.allclose(out[0], out[2], atol=1e-5)


def test_dnn_ignores_the_order() -> None:
    out = run(encoder("dnn"), [left_pad([3, 7, 11, 19]), left_pad([19, 11, 7, 3])])
    torch.testing.assert_close(out[0], out[1])


@pytest.mark.parametrize("layers", [1, 2])
def test_gru4rec_reads_only_the_items_whatever_the_padding(layers: int) -> None:
    """Packed sequences: a short history gives the same vector with any amount of left padding, in any batch."""
    enc = encoder("gru4rec", f"model.gru_layers={layers}")
    assert enc.gru.num_layers == layers
    items = [5, 9, 2]
    alone = run(enc, [items])  # no padding at all
    padded = run(enc, [left_pad(items), left_pad([1, 2, 3, 4, 5, 6, 7, 8]), left_pad([4])])
    torch.testing.assert_close(padded[0], alone[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run(enc, [left_pad([4])])[0], padded[2], rtol=1e-5, atol=1e-6)
    # the most recent item is the last one: the output follows it
    assert not torch.allclose(run(enc, [left_pad([*items, 6])])[0], padded[0], atol=1e-5)
    # only the last max_history items are read
    torch.testing.assert_close(run(enc, [[3, 3, *range(1, 9)]])[0], padded[1], rtol=1e-5, atol=1e-6)


def test_gru4rec_empty_history_is_finite() -> None:
    out = run(encoder("gru4rec"), [[0] * L, left_pad([1])])
    assert torch.isfinite(out).all() and out.shape == (2, 8)


def test_gru4rec_is_deterministic_in_eval_and_trains() -> None:
    enc = encoder("gru4rec", "model.dropout=0.3")
    hist = [left_pad([1, 2, 3]), left_pad([4, 5, 6, 7, 8, 9, 10, 11])]
    torch.testing.assert_close(run(enc, hist), run(enc, hist))  # eval: no dropout
    enc.train()
    out = enc(QueryBatch(torch.tensor(hist), torch.ones(2, 3, dtype=torch.long)))
    out.sum().backward()
    assert enc.gru.weight_hh_l0.grad is not None and enc.gru.weight_hh_l0.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["dnn", "sasrec", "gru4rec"])
def test_the_user_id_embedding_tells_users_with_the_same_history_apart(name: str) -> None:
    hist = torch.tensor([left_pad([3, 7, 11])] * 3, dtype=torch.long)
    feats = torch.tensor([[1, 2, 3]] * 3, dtype=torch.long)
    users = torch.tensor([2, 5, 2])
    with torch.no_grad():
        plain = encoder(name)(QueryBatch(hist, feats, users))
        with_id = encoder(name, "model.user_id=true")
        out = with_id(QueryBatch(hist, feats, users))
        unknown = with_id(QueryBatch(hist[:1], feats[:1], torch.tensor([0])))
    torch.testing.assert_close(plain[0], plain[1])  # without the option, user ids are not read
    assert not torch.allclose(out[0], out[1], atol=1e-5)
    torch.testing.assert_close(out[0], out[2])
    assert with_id.user.id_emb.weight.shape == (CTX.n_users + 1, 16)
    torch.testing.assert_close(with_id.user.id_emb(torch.tensor([0])), torch.zeros(1, 16))
    assert torch.isfinite(unknown).all()
    with pytest.raises(ValueError, match="user ids"):
        with_id(QueryBatch(hist, feats))


def test_the_data_context_carries_the_user_count_and_reads_old_checkpoints() -> None:
    assert DataContext.from_dict(CTX.to_dict()) == CTX
    old = {k: v for k, v in CTX.to_dict().items() if k != "n_users"}
    assert DataContext.from_dict(old).n_users == 0


def test_hidden_zero_makes_each_tower_one_linear_layer() -> None:
    from sparcode_cli.models.encoders import ItemEncoder

    enc = encoder("dnn", "model.hidden=0")
    linears = [m for m in enc.mlp if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 1 and linears[0].out_features == 8
    cfg = load_config("two-tower", overrides=["model.emb_dim=16", "model.dim=8", "model.hidden=0"])["model"]
    item = ItemEncoder(cfg, CTX)
    assert [type(m) for m in item.mlp] == [torch.nn.Linear]
    assert item(torch.tensor([1, 2])).shape == (2, 8)
