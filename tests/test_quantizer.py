"""The residual quantizer (models/quantizer.py): stages, straight-through gradients, EMA codebooks, dead-code
restarts, eval-mode purity, code ids, multi-probe beams; and that a run of the removed product quantizer is refused."""

from __future__ import annotations

import pytest
import torch

from sparcode_cli.errors import UserError
from sparcode_cli.models import model_from_checkpoint
from sparcode_cli.models.quantizer import ResidualQuantizer
from tests.test_sparsity import EXTRA, small_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_code_id_tuple_round_trip() -> None:
    pq = ResidualQuantizer(6, 3, 5)
    ids = torch.arange(pq.n_codes)
    t = pq.tuples_from_ids(ids)
    assert t.shape == (125, 3) and int(t.max()) == 4
    assert torch.equal(pq.ids_from_tuples(t), ids)
    assert pq.ids_from_tuples(torch.tensor([[1, 2, 3]])).item() == 1 * 25 + 2 * 5 + 3  # sum_m j_m N^(M-1-m)
    # decode = the sum of the M codewords
    z = pq.decode(torch.tensor([38]))
    assert torch.equal(z[0], pq.codebooks[0, 1] + pq.codebooks[1, 2] + pq.codebooks[2, 3])


def test_residual_assignment_in_row_blocks_is_the_nearest_codeword(monkeypatch: pytest.MonkeyPatch) -> None:
    """More tokens than one distance block (a partial last block too) get the same ids as one block."""
    torch.manual_seed(1)
    rq = ResidualQuantizer(8, 1, 64).eval()
    z = torch.randn(23, 8)
    whole = rq.assign(z)
    monkeypatch.setattr(ResidualQuantizer, "NEAREST_ROWS", 5)
    assert torch.equal(rq.assign(z), whole)
    assert torch.equal(whole[:, 0], torch.cdist(z, rq.codebooks[0]).argmin(1))


def test_straight_through_gradient_reaches_the_tokenizer() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(3, 8)
    pq = ResidualQuantizer(8, 2, 4, beta=0.0)
    x = torch.randn(16, 3)
    w = torch.randn(16, 8)
    zq, _, commit = pq(head(x))
    (zq * w).sum().backward()
    # d zq / d z = identity: the head gets exactly the gradient it would get without quantization
    expected = w.T @ x
    torch.testing.assert_close(head.weight.grad, expected)
    assert commit.item() == 0.0
    # the commitment loss pulls tokens toward their (fixed) codewords
    pq.beta = 0.25
    z = head(x).detach().requires_grad_(True)
    zq, _, commit = pq.eval()(z)
    commit.backward()
    torch.testing.assert_close(z.grad, 0.25 * 2 * (z - zq).detach() / z.numel())


def test_ema_moves_codewords_toward_their_inputs() -> None:
    torch.manual_seed(0)
    pq = ResidualQuantizer(2, 1, 4, decay=0.9, kmeans_iters=0)
    centres = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0], [0.0, -3.0]])
    x = (centres.repeat_interleave(32, 0) + 0.1 * torch.randn(128, 2)).contiguous()
    pq.train()
    pq(x)  # initialises (sets the EMA counts)
    pq.codebooks.copy_((centres + 0.5)[None])  # one codeword per cluster, each off its centre
    pq.ema_sum.copy_(pq.codebooks * pq.ema_count.unsqueeze(-1))

    def error() -> float:
        t = pq.tuples_from_ids(pq.encode(x))[:, 0]
        return float((pq.codebooks[0][t] - x).pow(2).sum(1).mean())

    before = error()
    for _ in range(50):
        pq(x)
    assert error() < 0.1 * before
    for c in centres:  # every cluster owns a codeword at its centre
        assert torch.cdist(c[None], pq.codebooks[0]).min() < 0.2


def test_dead_codes_are_restarted_from_current_inputs() -> None:
    torch.manual_seed(0)
    pq = ResidualQuantizer(2, 1, 8, decay=0.8, dead_threshold=0.1, kmeans_iters=0).train()
    x = torch.randn(64, 2)
    pq(x)  # init
    far = torch.full((8, 2), 100.0)
    far[:2] = x[:2]
    pq.codebooks.copy_(far[None])  # 6 codewords nobody will ever pick
    pq.ema_sum.copy_(pq.codebooks * pq.ema_count.unsqueeze(-1))
    pq.reset_usage()
    for _ in range(20):
        pq(x)
    assert pq.restarts >= 6
    assert pq.codebooks.abs().max() < 50  # no codeword left out at 100
    stats = pq.usage_stats()
    assert stats["codes_in_use"][0] > 2 and stats["restarts"] >= 6
    assert pq.restarts == 0  # reset by usage_stats


def test_eval_never_changes_a_codebook() -> None:
    torch.manual_seed(0)
    pq = ResidualQuantizer(4, 2, 8)
    pq.eval()
    before = {k: v.clone() for k, v in pq.state_dict().items()}
    for _ in range(5):
        pq(torch.randn(32, 4) * 10)
        pq.encode(torch.randn(32, 4))
    for k, v in pq.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not bool(pq.initted)  # not even the first-batch k-means init


def test_kmeans_init_and_usage_stats() -> None:
    torch.manual_seed(0)
    pq = ResidualQuantizer(4, 2, 4, kmeans_iters=10).train()
    x = torch.randn(200, 4)
    pq(x)
    assert bool(pq.initted)
    stats = pq.usage_stats()
    assert stats["codes_in_use"] == [4, 4]
    assert all(1.0 < p <= 4.0 for p in stats["perplexity"])
    assert 1 <= stats["distinct_tuples"] <= 16
    # init_from given vectors (the two-tower warm start): stage 1 takes the vector, stage 2 the nothing it leaves
    pq.init_from(torch.zeros(10, 4) + torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.allclose(pq.codebooks[0], torch.tensor([1.0, 2.0, 3.0, 4.0]).expand(4, 4))
    assert torch.equal(pq.codebooks[1], torch.zeros(4, 4))


# ------------------------------------------------------------------------------------------------ stages
def test_residual_stages_quantize_what_the_earlier_left() -> None:
    torch.manual_seed(0)
    rq = ResidualQuantizer(4, 3, 5).eval()
    assert rq.codebooks.shape == (3, 5, 4)  # full-width codewords
    z = torch.randn(40, 4)
    zq, ids, _ = rq(z)
    t = rq.tuples_from_ids(ids)
    r = z.clone()
    for m in range(3):  # greedy: each stage the nearest codeword to the residual left by the earlier ones
        assert torch.equal(t[:, m], torch.cdist(r, rq.codebooks[m]).argmin(1))
        r = r - rq.codebooks[m][t[:, m]]
    torch.testing.assert_close(zq, sum(rq.codebooks[m][t[:, m]] for m in range(3)))
    torch.testing.assert_close(rq.decode(ids), zq)
    ResidualQuantizer(5, 2, 4)  # no divisibility needed


def test_residual_ema_and_restarts_train_every_stage() -> None:
    torch.manual_seed(0)
    rq = ResidualQuantizer(4, 2, 4, kmeans_iters=5).train()
    x = torch.randn(256, 4)
    for _ in range(30):
        rq(x)
    stats = rq.usage_stats()
    assert stats["codes_in_use"] == [4, 4] and stats["distinct_tuples"] > 4
    # the second stage's codewords are residual-sized: smaller than the first's
    assert rq.codebooks[1].norm(dim=1).mean() < rq.codebooks[0].norm(dim=1).mean()


# ------------------------------------------------------------------------------------------------ multi-probe
def _brute_nearest(q: ResidualQuantizer, z: torch.Tensor, p: int) -> torch.Tensor:
    """The p code ids whose decoded vectors are nearest to each token, over the whole code universe."""
    d2 = torch.cdist(z, q.decode(torch.arange(q.n_codes))).pow(2)
    return d2.topk(p, dim=1, largest=False).indices


def test_one_probe_is_the_code_the_token_trains_on() -> None:
    torch.manual_seed(2)
    q = ResidualQuantizer(6, 2, 7).eval()
    z = torch.randn(4, 5, 6)
    _, trained_ids, _ = q(z)  # the forward pass's codes: what the loss sees
    assert torch.equal(q.nearest(z, 1), trained_ids.unsqueeze(-1))
    assert q.nearest(z[:0], 1).shape == q.nearest(z[:0], 3).shape[:-1] + (1,) == (0, 5, 1)  # an empty batch


@pytest.mark.parametrize("p", [2, 3, 4, 8])
def test_residual_probes_always_include_the_trained_code(p: int) -> None:
    """The beam can push the greedy tuple out at the last stage; the greedy code then takes the last place."""
    torch.manual_seed(6)
    q = ResidualQuantizer(8, 3, 6)
    q.init_from(torch.randn(400, 8))  # k-means codebooks, where the beam and the greedy path disagree
    q.eval()
    z = torch.randn(500, 8)
    got = q.nearest(z, p)
    greedy = q.encode(z)
    assert (got == greedy.unsqueeze(1)).any(1).all()
    assert all(len(set(r.tolist())) == p for r in got)  # still p distinct codes


def test_residual_probes_are_a_beam_exact_when_it_holds_every_first_stage_word() -> None:
    torch.manual_seed(4)
    q = ResidualQuantizer(8, 2, 6).eval()
    z = torch.randn(40, 8)
    # width N: the first stage keeps all its N words, so the second ranks all N^2 sums
    assert torch.equal(q.nearest(z, 6), _brute_nearest(q, z, 6))
    got = q.nearest(z.reshape(8, 5, 8), 3)
    assert got.shape == (8, 5, 3)
    flat = got.reshape(40, 3)
    assert all(len(set(r.tolist())) == 3 for r in flat)  # distinct codes
    d2 = (z.unsqueeze(1) - q.decode(flat)).pow(2).sum(-1)
    assert (d2.diff(dim=1) >= -1e-5).all()  # nearest first
    greedy = (z - q.decode(q.encode(z))).pow(2).sum(-1)
    assert (d2[:, 0] <= greedy + 1e-5).all()  # the beam never does worse than the greedy assignment


def test_probes_on_a_flat_codebook_are_the_nearest_codewords() -> None:
    torch.manual_seed(5)
    q = ResidualQuantizer(4, 1, 16).eval()
    z = torch.randn(20, 4)
    assert torch.equal(q.nearest(z, 5), _brute_nearest(q, z, 5))


# ------------------------------------------------------------------------------------------------ removed: product
@pytest.mark.parametrize(("quantizer", "loads"), [("residual", True), ("product", False), (None, False)])
def test_a_run_of_the_removed_product_quantizer_is_refused(quantizer: str | None, loads: bool) -> None:
    """A checkpoint that says "product", or predates the key (its quantizer was the product one), is refused with
    a UserError naming the key (exit code 2), never decoded with residual codebooks; a residual one loads."""
    model, _ = small_model("sparcode", *EXTRA)
    model.eval()
    cfg = {k: v for k, v in model.cfg.items() if k != "quantizer"}  # None: a run from before the key
    if quantizer is not None:
        cfg["quantizer"] = quantizer
    ckpt = {
        "model": "sparcode",
        "config": {"model": cfg},
        "ctx": model.ctx.to_dict(),
        "state_dict": model.state_dict(),
    }
    if not loads:
        with pytest.raises(UserError, match=r"model\.quantizer = 'product', which sparcode no longer has"):
            model_from_checkpoint(ckpt)
        return
    codes = torch.arange(model.n_codes)
    with torch.inference_mode():
        assert torch.equal(model_from_checkpoint(ckpt).score_codes(codes), model.score_codes(codes))
