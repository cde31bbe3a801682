"""`sparcode index`: the SparCode code -> item index and the two-tower Faiss index, against exact scoring.

Tiny models are trained with the real trainer on a synthetic group-table dataset (written as a CSV and
preprocessed, so the artifact records a real processed folder). A few dozen steps leave SparCode's query
encoder almost constant (every user on one or two codes), so `spread_codes` makes the trained model's codes
diverse: random token heads, the first stage's codewords drawn from real user tokens (later stages from
differences of two), the bias at the 70th percentile of g. It
is still a valid SparCode model, and the index must reproduce it exactly whatever its weights.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from sparcode_cli import indexing
from sparcode_cli.config import load_config
from sparcode_cli.data.dataset import Dataset, Ragged
from sparcode_cli.data.queries import last_items, query_batch
from sparcode_cli.errors import UserError
from sparcode_cli.evaluation import Artifact, exact_topk, index_retrieve, load_artifact
from sparcode_cli.indexing import build_code_index, build_index, encode_users, reached_codes
from sparcode_cli.models import load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint
from sparcode_cli.retrieval.faiss_index import build_faiss_index, search
from sparcode_cli.retrieval.sparse_index import CodeIndex, overlap_at_k, retrieve, topk_dense
from sparcode_cli.training.trainer import train
from tests.cli import exit_code
from tests.synthetic import group_table, write_csv

SMALL = [
    "model.dim=16",
    "model.emb_dim=16",
    "model.hidden=32",
    "model.max_history=8",
    "train.batch_size=64",
    "train.n_negatives=32",
    "train.lr=0.01",
    "train.threads=1",
    "train.max_steps=30",
]
SPARCODE = [
    *SMALL,
    "model.token_dim=16",
    "model.k_u=4",
    "model.n_codewords=8",  # M = 2: 64 codes
    "model.interaction_hidden=8",
    "model.density_warmup=10",
    "model.target_density=0.2",
    "train.max_steps=120",  # past the quantizer's warm-up (quantize_after, 100 steps by default) ...
    "train.patience=0",  # ... which early stopping would cut short (validation recall is 0 until then)
]


def quiet_train(ds: Dataset, model: str, overrides: list[str], out: Path) -> Path:
    cfg = load_config(model, overrides=overrides)
    return train(ds, cfg, out, console=Console(file=io.StringIO()), progress=False).run_dir


def spread_codes(run_dir: Path, ds: Dataset) -> None:
    """Rewrite the run's best checkpoint with diverse codes (see the module docstring)."""
    path = run_dir / "checkpoint_best.pt"
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.user_heads.weight.copy_(torch.randn(model.user_heads.weight.shape, generator=gen))
        model.user_heads.bias.zero_()
        users = np.arange(1, ds.n_users + 1)
        q = query_batch(last_items(ds.train, users, 8), ds.features.user_feats[users])
        z = model.user_tokens(q).reshape(-1, model.token_dim)
        n = model.quantizer.N
        pick = torch.randperm(len(z), generator=gen)[: 3 * n]
        # stage 1 real user tokens; later stages differences of two of them, residual-sized
        books = [z[pick[:n]]]
        books += [0.5**m * (z[pick[n : 2 * n]] - z[pick[2 * n :]]) for m in range(1, model.quantizer.M)]
        model.quantizer.codebooks.copy_(torch.stack(books))
        model.bias.fill_(100.0)
        g = model.score_codes(torch.from_numpy(reached_codes(model, ds)))[:, 1:] - 100.0
        model.bias.fill_(-float(torch.quantile(g.flatten(), 0.7)))  # 30% of the reached pairs kept
    extra = {k: v for k, v in ckpt.items() if k not in ("format", "model", "config", "ctx", "state_dict")}
    extra.pop("optimizer", None)
    extra.pop("rng", None)
    save_checkpoint(path, make_checkpoint(model, ckpt["config"], with_rng=False, **extra))


@dataclass
class Board:
    csv: Path
    folder: Path
    ds: Dataset
    runs: dict[str, Path] = field(default_factory=dict)


_BOARD: dict[str, Board] = {}


def board(tmp_path_factory: pytest.TempPathFactory) -> Board:
    """One preprocessed synthetic dataset and its trained runs, shared by the index and eval tests."""
    if "board" in _BOARD:
        return _BOARD["board"]
    from sparcode_cli.data.preprocess import prepare
    from sparcode_cli.data.store import load_dataset

    root = tmp_path_factory.mktemp("board")
    csv = write_csv(
        group_table(n_groups=16, users_per_group=12, items_per_group=10, seq_len=12), root / "board.csv"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARCODE_HOME", str(root / "home"))
        folder = prepare(csv, progress=False)
    ds = load_dataset(folder)
    b = Board(csv, folder, ds)
    b.runs["sparcode"] = quiet_train(ds, "sparcode", SPARCODE, root / "runs")
    spread_codes(b.runs["sparcode"], ds)
    b.runs["two-tower"] = quiet_train(ds, "two-tower", SMALL, root / "runs")
    b.runs["popularity"] = quiet_train(ds, "popularity", [], root / "runs")
    _BOARD["board"] = b
    return b


@pytest.fixture(scope="module")
def bd(tmp_path_factory: pytest.TempPathFactory) -> Board:
    return board(tmp_path_factory)


_cli = exit_code


def test_codes(bd: Board) -> None:
    model = model_from_checkpoint(load_checkpoint(bd.runs["sparcode"]))
    codes = reached_codes(model, bd.ds)
    assert 8 <= len(codes) < model.n_codes  # spread over many codes, not the whole universe
    enc = encode_users(model, bd.ds, bd.ds.test.query, bd.ds.test.users)
    width = model.k_u * model.probes  # each token's `probes` nearest codes
    assert enc.shape == (len(bd.ds.test.users), width) and (np.diff(enc, axis=1) >= 0).all()  # sorted rows


# ------------------------------------------------------------------------------------------------ sparse
def test_sparse_index_equals_exact_scoring(bd: Board, tmp_path: Path) -> None:
    ds = bd.ds
    m = build_index(bd.runs["sparcode"], tmp_path / "out", ds=ds, codes="reached", progress=False)
    assert m["kind"] == "sparse" and m["codes"] == "reached" and m["max_per_code"] is None
    assert m["nnz"] > 0 and m["density"] == pytest.approx(m["nnz"] / (m["n_codes_built"] * ds.n_items))
    assert 0.2 < m["density"] < 0.4 and m["pairs_per_s"] > 0 and m["build_s"] > 0
    for name in ("manifest.json", "index.npz", "index_codes.npz", "query_encoder.pt", "items.parquet"):
        assert (tmp_path / "out" / name).is_file(), name
    art = load_artifact(tmp_path / "out")
    for split in ("valid", "test"):
        es = ds.split(split)
        enc = encode_users(art.model, ds, es.query, es.users)
        top = index_retrieve(art, enc, es.query, 50)
        ref = exact_topk(art.model, ds, es.query, es.users, 50)
        np.testing.assert_array_equal(top.lengths, ref.lengths)
        np.testing.assert_array_equal(top.items, ref.items)
        # same lists, same scores bit for bit (on-the-fly users too: their rows are added in code order)
        np.testing.assert_array_equal(top.scores, ref.scores)
        assert overlap_at_k(top, ref, 20) == 1.0 and overlap_at_k(top, ref, 50) == 1.0
        for u in range(len(es.users)):  # history never returned
            assert not set(top.row(u)[0].tolist()) & set(es.query.row(u).tolist())


def test_codes_without_a_row_are_scored_on_the_fly(bd: Board) -> None:
    ds = bd.ds
    model = model_from_checkpoint(load_checkpoint(bd.runs["sparcode"]))
    codes = reached_codes(model, ds)
    index, _ = build_code_index(model, codes[::2])  # half of them: the other half on the fly
    art = Artifact(Path("."), {"kind": "sparse"}, model, index)
    enc = encode_users(model, ds, ds.test.query, ds.test.users)
    top = index_retrieve(art, enc, ds.test.query, 20)
    assert top.n_on_the_fly_users == int((~np.isin(enc, codes[::2])).any(axis=1).sum()) > 0
    ref = exact_topk(model, ds, ds.test.query, ds.test.users, 20)
    np.testing.assert_array_equal(top.items, ref.items)
    # the kernel adds on-the-fly and index rows together in ascending code order, as score_all does
    np.testing.assert_array_equal(top.scores, ref.scores)


def test_max_per_code_equals_the_capped_table(bd: Board, tmp_path: Path) -> None:
    ds, cap = bd.ds, 7
    m = build_index(
        bd.runs["sparcode"], tmp_path / "out", ds=ds, max_per_code=cap, codes="all", progress=False
    )
    assert m["max_per_code"] == cap and m["nnz"] <= cap * m["n_codes_built"]
    art = load_artifact(tmp_path / "out")
    model = art.model
    with torch.inference_mode():
        table = model.score_codes(torch.arange(model.n_codes)).numpy()  # (n_codes, n_items + 1)
    stored = np.zeros_like(table)
    for r in range(len(table)):  # brute force: each row's best `cap` positive scores, ties by smaller id
        nz = np.flatnonzero(table[r, 1:] > 0) + 1
        best = nz[np.lexsort((nz, -table[r, nz]))][:cap]
        stored[r, best] = table[r, best]
    es = ds.test
    enc = encode_users(model, ds, es.query, es.users)
    dense = np.zeros((len(enc), table.shape[1]), dtype=np.float32)
    for j in range(enc.shape[1]):  # sorted code order, as the kernel adds them
        dense += stored[enc[:, j]]
    ref = topk_dense(dense, es.query, 20, exclude_nonpositive=True)
    top = index_retrieve(art, enc, es.query, 20)
    np.testing.assert_array_equal(top.lengths, ref.lengths)
    np.testing.assert_array_equal(top.items, ref.items)
    assert top.lengths.max() <= cap * enc.shape[1]


def test_codes_all_builds_the_universe(bd: Board, tmp_path: Path) -> None:
    m = build_index(bd.runs["sparcode"], tmp_path / "out", ds=bd.ds, codes="all", progress=False)
    assert m["n_codes_built"] == m["n_codes_universe"] == 8**2
    index = CodeIndex.load(tmp_path / "out")
    np.testing.assert_array_equal(index.code_ids, np.arange(64))


def test_bias_override_travels_with_the_query_encoder(bd: Board, tmp_path: Path) -> None:
    ds = bd.ds
    base = build_index(bd.runs["sparcode"], tmp_path / "a", ds=ds, progress=False)
    higher = base["bias_trained"] - 1.0  # a lower bias: a higher cut, a sparser index
    m = build_index(bd.runs["sparcode"], tmp_path / "b", ds=ds, bias=higher, progress=False)
    assert m["bias"] == pytest.approx(higher) and m["bias_trained"] == base["bias_trained"]
    assert m["nnz"] < base["nnz"]
    art = load_artifact(tmp_path / "b")
    assert float(art.model.bias) == pytest.approx(higher)
    enc = encode_users(art.model, ds, ds.test.query, ds.test.users)
    top = index_retrieve(art, enc, ds.test.query, 50)
    ref = exact_topk(art.model, ds, ds.test.query, ds.test.users, 50)
    assert overlap_at_k(top, ref, 50) == 1.0 and top.lengths.mean() < 50  # shorter lists, said so


def test_auto_builds_the_whole_universe_when_it_is_small(
    bd: Board, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """codes="auto" (the default): every code when N^M x (n_items + 1) <= AUTO_ALL_PAIRS, else the reached ones."""
    ds = bd.ds
    m = build_index(bd.runs["sparcode"], tmp_path / "a", ds=ds, progress=False)
    assert (
        m["codes_requested"] == "auto" and m["codes"] == "all" and m["n_codes_built"] == m["n_codes_universe"]
    )
    art = load_artifact(tmp_path / "a")
    es = ds.split("test")
    enc = encode_users(art.model, ds, es.query, es.users)
    assert np.isin(enc, art.index.code_ids).all()  # no test user is scored on the fly
    assert indexing.resolve_codes("auto", 64, ds.n_items) == "all"
    monkeypatch.setattr(indexing, "AUTO_ALL_PAIRS", 64 * (ds.n_items + 1) - 1)
    assert indexing.resolve_codes("auto", 64, ds.n_items) == "reached"
    assert indexing.resolve_codes("all", 1 << 40, ds.n_items) == "all"
    m = build_index(bd.runs["sparcode"], tmp_path / "b", ds=ds, progress=False)
    assert m["codes_requested"] == "auto" and m["codes"] == "reached"
    assert m["n_codes_built"] < m["n_codes_universe"]


def test_save_load_gives_identical_retrieval(bd: Board, tmp_path: Path) -> None:
    ds = bd.ds
    model = model_from_checkpoint(load_checkpoint(bd.runs["sparcode"]))
    index, _ = build_code_index(model, reached_codes(model, ds))
    build_index(bd.runs["sparcode"], tmp_path / "sp", ds=ds, codes="reached", progress=False)
    art = load_artifact(tmp_path / "sp")
    assert (art.index.matrix != index.matrix).nnz == 0
    np.testing.assert_array_equal(art.index.code_ids, index.code_ids)
    enc = encode_users(model, ds, ds.test.query, ds.test.users)
    score = lambda c: model.score_codes(torch.from_numpy(c)).numpy()  # noqa: E731
    a = retrieve(index, enc, ds.test.query, 20, on_the_fly=score)
    b = index_retrieve(art, enc, ds.test.query, 20)
    np.testing.assert_array_equal(a.items, b.items)
    np.testing.assert_array_equal(a.scores, b.scores)
    # two-tower: the saved Faiss index searches like the one in memory
    tt = model_from_checkpoint(load_checkpoint(bd.runs["two-tower"]))
    with torch.inference_mode():
        vecs = tt.item_embeddings().numpy()
    build_index(bd.runs["two-tower"], tmp_path / "tt", ds=ds, faiss_kind="hnsw", progress=False)
    art = load_artifact(tmp_path / "tt")
    q = encode_users(art.model, ds, ds.test.query, ds.test.users)
    a = search(build_faiss_index(vecs, "hnsw"), q, ds.test.query, 20)
    b = index_retrieve(art, q, ds.test.query, 20)
    np.testing.assert_array_equal(a.items, b.items)


# ------------------------------------------------------------------------------------------------ faiss
def test_faiss_flat_equals_numpy_brute_force(bd: Board, tmp_path: Path) -> None:
    ds = bd.ds
    m = build_index(bd.runs["two-tower"], tmp_path / "out", ds=ds, progress=False)
    assert m["kind"] == "flat" and m["index_bytes"] > 0 and (tmp_path / "out" / "index.faiss").is_file()
    art = load_artifact(tmp_path / "out")
    with torch.inference_mode():
        items = art.model.item_embeddings().double().numpy()
    es = ds.test
    q = encode_users(art.model, ds, es.query, es.users)
    scores = q.astype(np.float64) @ items.T
    ref = topk_dense(scores, es.query, 50, exclude_nonpositive=False)
    top = index_retrieve(art, q, es.query, 50)
    np.testing.assert_array_equal(top.lengths, ref.lengths)
    np.testing.assert_array_equal(top.items, ref.items)
    np.testing.assert_allclose(top.scores, ref.scores, rtol=1e-4, atol=1e-4)
    assert not (top.items == 0).any()  # item 0 (padding) was never added


# ------------------------------------------------------------------------------------------------ refusals
def test_models_without_an_index_point_to_eval_run(bd: Board, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="sparcode eval --run") as exc:
        build_index(bd.runs["popularity"], tmp_path / "out", ds=bd.ds)
    assert "popularity" in str(exc.value) and not (tmp_path / "out").exists()
    assert _cli(["index", str(bd.runs["popularity"]), "--out", str(tmp_path / "out")]) == 2


def test_memory_budget_refusal(bd: Board, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UserError, match="memory budget"):
        build_index(bd.runs["sparcode"], tmp_path / "out", ds=bd.ds, codes="all", memory_budget_mb=0.01)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []  # no temp folder left
    args = ["index", str(bd.runs["sparcode"]), "--out", str(tmp_path / "out"), "--memory-budget-mb", "0.01"]
    assert _cli([*args, "--dataset", str(bd.csv), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "memory budget" in err and "--max-per-code" in err and "Traceback" not in err


def test_option_checks(bd: Board, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--faiss applies to two-tower"):
        build_index(bd.runs["sparcode"], tmp_path / "o", ds=bd.ds, faiss_kind="hnsw")
    with pytest.raises(UserError, match="apply to sparcode"):
        build_index(bd.runs["two-tower"], tmp_path / "o", ds=bd.ds, max_per_code=3)
    with pytest.raises(UserError, match="--codes"):
        build_index(bd.runs["sparcode"], tmp_path / "o", ds=bd.ds, codes="some")
    with pytest.raises(UserError, match="does not exist"):
        build_index(tmp_path / "nope", tmp_path / "o", ds=bd.ds)


def test_out_folder_is_replaced_whole_or_refused(bd: Board, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not an index artifact"):
        build_index(bd.runs["two-tower"], other, ds=bd.ds)
    assert (other / "notes.txt").read_text() == "mine"
    out = tmp_path / "out"
    build_index(bd.runs["sparcode"], out, ds=bd.ds, progress=False)
    build_index(bd.runs["two-tower"], out, ds=bd.ds, progress=False)  # a previous artifact is replaced
    assert json.loads((out / "manifest.json").read_text())["model"] == "two-tower"
    assert not (out / "index.npz").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "out"]  # no temporary folders left


def test_cli_index_prints_the_table(bd: Board, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    args = ["index", str(bd.runs["sparcode"]), "--out", str(out), "--dataset", str(bd.csv), "--threads", "1"]
    assert _cli([*args, "--max-per-code", "9", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for word in ("nnz", "density", "index size", "build time", "pairs/s"):
        assert word in printed, word
    m = json.loads((out / "manifest.json").read_text())
    assert m["data_hash"] == bd.ds.data_hash and m["processed_dir"] and m["checkpoint_sha256"]
    assert m["max_per_code"] == 9 and m["threads"] == 1 and "faiss" in m["versions"]
    raw = torch.load(out / "query_encoder.pt", weights_only=True)
    assert raw["model"] == "sparcode" and "state_dict" in raw and "ctx" in raw


def test_mismatched_data_hash_and_truncated_files_exit_2(
    bd: Board, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    build_index(bd.runs["sparcode"], out, ds=bd.ds, progress=False)
    manifest = out / "manifest.json"
    good = manifest.read_text()
    manifest.write_text(good.replace(bd.ds.data_hash, "board-000000000000"))
    assert _cli(["eval", "--index", str(out), "--dataset", str(bd.csv)]) == 2
    err = capsys.readouterr().err
    assert "data hash mismatch" in err and "Traceback" not in err
    manifest.write_text(good)
    npz = out / "index.npz"
    data = npz.read_bytes()
    npz.write_bytes(data[: len(data) // 2])
    assert _cli(["eval", "--index", str(out)]) == 2
    assert "truncated" in capsys.readouterr().err
    with pytest.raises(UserError, match="truncated or corrupt"):  # the same size, garbage inside
        npz.write_bytes(b"\0" * len(data))
        load_artifact(out)
    npz.write_bytes(data)
    assert load_artifact(out).index.nnz > 0
    manifest.write_text("{not json")
    assert _cli(["eval", "--index", str(out)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    manifest.unlink()
    assert _cli(["eval", "--index", str(out)]) == 2
    assert "not a complete index artifact" in capsys.readouterr().err


def test_corrupt_query_encoder_is_a_user_error(bd: Board, tmp_path: Path) -> None:
    out = tmp_path / "out"
    build_index(bd.runs["two-tower"], out, ds=bd.ds, progress=False)
    enc = out / "query_encoder.pt"
    data = enc.read_bytes()
    enc.write_bytes(b"x" * len(data))
    with pytest.raises(UserError, match="query_encoder.pt"):
        load_artifact(out)
    enc.write_bytes(data)
    f = out / "index.faiss"
    fdata = f.read_bytes()
    f.write_bytes(b"\0" * len(fdata))
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_artifact(out)


def test_artifact_gets_the_umask_mode_not_the_temporary_files(bd: Board, tmp_path: Path) -> None:
    """An index folder is meant to be copied and served: plain `umask` modes, not mkstemp's private 0600."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        build_index(bd.runs["sparcode"], out, ds=bd.ds, progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes


def test_compact_scores_option(bd: Board, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--scores uint8: recorded in the manifest and the index files, a smaller index, lists equal to an exact
    top-k of the dequantized scores; a bad value is refused (exit 2); two-tower runs refuse it."""
    ds = bd.ds
    base = build_index(bd.runs["sparcode"], tmp_path / "f32", ds=ds, codes="reached", progress=False)
    assert base["scores"] == "float32"
    out = tmp_path / "u8"
    args = ["index", str(bd.runs["sparcode"]), "--out", str(out), "--dataset", str(bd.csv), "--threads", "1"]
    assert _cli([*args, "--codes", "reached", "--scores", "uint8", "--no-progress"]) == 0
    assert "uint8" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert m["scores"] == "uint8" and m["nnz"] == base["nnz"] and m["index_bytes"] < base["index_bytes"]
    art = load_artifact(out)
    assert art.index.encoding == "uint8" and art.index.matrix.data.min() >= 1
    ref_index = load_artifact(tmp_path / "f32").index
    enc = encode_users(art.model, ds, ds.test.query, ds.test.users)
    top = index_retrieve(art, enc, ds.test.query, 20)
    deq = CodeIndex(art.index.dequantized(), art.index.code_ids)  # the decoded scores, as a float32 index
    hist = ds.test.query
    sel = np.flatnonzero(deq.row_of(enc)[1].all(axis=1))  # users whose codes all have a row
    assert len(sel) > 0
    sub = Ragged.from_lists([hist.row(u) for u in sel])
    np.testing.assert_array_equal(top.items[sel], retrieve(deq, enc[sel], sub, 20).items)
    assert (retrieve(ref_index, enc[sel], sub, 20).lengths == top.lengths[sel]).all()  # nothing dropped
    assert _cli([*args, "--scores", "int4", "--no-progress"]) == 2
    assert "--scores" in capsys.readouterr().err
    with pytest.raises(UserError, match="apply to sparcode"):
        build_index(bd.runs["two-tower"], tmp_path / "o", ds=ds, scores="float16")
    with pytest.raises(UserError, match="--scores"):
        build_index(bd.runs["sparcode"], tmp_path / "o", ds=ds, scores="int4")
