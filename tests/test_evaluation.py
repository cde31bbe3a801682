"""`sparcode eval`: metrics, overlap with exact scoring, timings and the saved top-k on tiny synthetic data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from sparcode_cli.data.dataset import Dataset
from sparcode_cli.errors import UserError
from sparcode_cli.evaluation import evaluate_index, evaluate_run, load_artifact, parse_ks
from sparcode_cli.indexing import build_index, encode_users
from sparcode_cli.metrics import evaluate, metrics_from_topk
from sparcode_cli.models import load_checkpoint, model_from_checkpoint
from tests.cli import exit_code
from tests.test_indexing import SMALL, SPARCODE, Board, board, write_csv

FIELDS = [
    "retriever", "model", "kind", "run_id", "dataset", "data_hash", "split", "ks", "n_users",
    *(f"{m}@{k}" for k in (20, 50) for m in ("recall", "ndcg", "precision", "hitrate", "list_len")),
    "overlap@20", "overlap@50",
    "overlap_reference", "overlap_users", "threads", "qps_batch", "latency_p50_ms", "latency_p99_ms",
    "qps_batch_1t", "latency_p50_ms_1t", "latency_p99_ms_1t", "retrieve_s", "encode_s", "encode_qps",
    "encode_latency_p50_ms", "latency_queries", "timing_repeats", "timing_includes_encoding", "index_bytes", "nnz", "density",
    "n_codes_built", "mean_list_len", "short_lists", "users_on_the_fly", "build_s", "pairs_per_s", "bias",
    "max_per_code", "versions", "created", "eval_s",
]  # fmt: skip


@pytest.fixture(scope="module")
def bd(tmp_path_factory: pytest.TempPathFactory) -> Board:
    return board(tmp_path_factory)


_cli = exit_code


def recompute(topk_file: Path, ds: Dataset, split: str, ks: tuple[int, ...] = (20, 50)) -> dict[str, float]:
    """Metrics from a saved top-k Parquet, mapping the raw ids back to the dataset's dense ids."""
    df = pl.read_parquet(topk_file).sort(["user", "rank"])
    assert df.columns == ["user", "rank", "item", "score"]
    item_of = {str(r): i for i, r in enumerate(ds.item_raw_ids) if i}
    user_of = {str(r): u for u, r in enumerate(ds.user_raw_ids) if u}
    es = ds.split(split)
    row_of = {int(u): r for r, u in enumerate(es.users)}
    top = np.zeros((len(es.users), max(ks)), dtype=np.int64)
    for user, rank, item in zip(df["user"], df["rank"], df["item"], strict=True):
        top[row_of[user_of[user]], rank - 1] = item_of[item]
    return metrics_from_topk(top, es.targets, ks, users=es.users).summary


def test_metrics_json_has_every_field_and_markdown_appends(bd: Board, tmp_path: Path) -> None:
    out = tmp_path / "sp"
    build_index(bd.runs["sparcode"], out, ds=bd.ds, progress=False)
    res = evaluate_index(out, bd.ds, "test", (20, 50), threads=2, latency_queries=50)
    for f in FIELDS:
        assert f in res, f
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(res))
    assert res["overlap@20"] == res["overlap@50"] == 1.0 and res["overlap_users"] == res["n_users"]
    assert res["threads"] == 2 and res["qps_batch"] > 0 and res["qps_batch_1t"] > 0
    assert 0 < res["latency_p50_ms"] <= res["latency_p99_ms"] and res["latency_queries"] == 50
    assert res["timing_includes_encoding"] is False and res["encode_s"] > 0
    assert res["timing_repeats"] == 3  # every rate the median of 3 passes (sparcode_cli.timing)
    # the index's metrics are exactly those of exact model scoring (metrics.evaluate)
    exact = evaluate(model_from_checkpoint(load_checkpoint(out / "query_encoder.pt")), bd.ds, "test")
    for k in ("recall@20", "ndcg@50", "precision@20", "hitrate@50", "list_len@50"):
        assert res[k] == pytest.approx(exact.summary[k], abs=1e-12), k
    lines = (out / "results.md").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("| model | retriever") and "sparcode-index" in lines[2]
    evaluate_index(out, bd.ds, "valid", (20, 50), threads=1, latency_queries=10)
    lines = (out / "results.md").read_text().splitlines()
    assert len(lines) == 4 and "| valid |" in lines[3]  # appended under the same header


def test_probes_change_only_which_rows_a_user_reads(bd: Board, tmp_path: Path) -> None:
    """`sparcode index --probes` travels with the query encoder; `sparcode eval --probes` overrides it without a
    rebuild; either way the index serves the exact scores of the model with that many probes."""
    one, four = tmp_path / "p1", tmp_path / "p4"
    m1 = build_index(bd.runs["sparcode"], one, ds=bd.ds, probes=1, codes="all", progress=False)
    m4 = build_index(bd.runs["sparcode"], four, ds=bd.ds, probes=4, codes="all", progress=False)
    assert (m1["probes"], m4["probes"]) == (1, 4) and m1["nnz"] == m4["nnz"]  # the same index
    assert load_checkpoint(four / "query_encoder.pt")["config"]["model"]["probes"] == 4
    kw = dict(threads=1, latency_queries=5, exact_users=10_000, write=False)
    r1 = evaluate_index(one, bd.ds, "test", (20, 50), **kw)
    r4 = evaluate_index(four, bd.ds, "test", (20, 50), **kw)
    assert (r1["probes"], r4["probes"]) == (1, 4)
    assert r1["overlap@50"] == r4["overlap@50"] == 1.0  # each against exact scoring with its own probes
    assert any(r4[k] != r1[k] for k in ("recall@20", "recall@50", "ndcg@20", "ndcg@50"))  # other rankings
    for folder, width in ((one, 4), (four, 16)):  # K_u = 4 tokens, P codes each
        art = load_artifact(folder)
        assert encode_users(art.model, bd.ds, bd.ds.test.query, bd.ds.test.users).shape[1] == width
    again = evaluate_index(one, bd.ds, "test", (20, 50), probes=4, **kw)  # served with 4, no rebuild
    assert again["probes"] == 4 and again["overlap@50"] == 1.0
    for k in ("recall@20", "recall@50", "ndcg@50", "list_len@50"):
        assert again[k] == r4[k], k
    # an index of the codes users reach at P = 1, served at P = 4: the codes it lacks are scored on the fly
    reached = tmp_path / "reached"
    build_index(bd.runs["sparcode"], reached, ds=bd.ds, probes=1, codes="reached", progress=False)
    wide = evaluate_index(reached, bd.ds, "test", (20, 50), probes=4, **kw)
    assert wide["users_on_the_fly"] > 0 and wide["overlap@50"] == 1.0
    for k in ("recall@20", "recall@50", "ndcg@50"):
        assert wide[k] == r4[k], k
    with pytest.raises(UserError, match="--probes must be between 1 and the model's 64 code ids"):
        evaluate_index(one, bd.ds, probes=65, **kw)
    tt = tmp_path / "tt"
    build_index(bd.runs["two-tower"], tt, ds=bd.ds, progress=False)
    with pytest.raises(UserError, match="--probes applies to a sparcode index"):
        evaluate_index(tt, bd.ds, probes=2, **kw)
    with pytest.raises(UserError, match="apply to sparcode runs"):
        build_index(bd.runs["two-tower"], tmp_path / "x", ds=bd.ds, probes=2, progress=False)
    assert _cli(["eval", "--run", str(bd.runs["sparcode"].parent), "--probes", "2"]) == 2
    assert _cli(["eval", "--index", str(one), "--probes", "0"]) == 2


def test_two_tower_hnsw_overlap_is_against_flat(bd: Board, tmp_path: Path) -> None:
    out = tmp_path / "hnsw"
    build_index(
        bd.runs["two-tower"], out, ds=bd.ds, faiss_kind="hnsw", hnsw_m=8, ef_search=16, progress=False
    )
    res = evaluate_index(out, bd.ds, ks=(10,), threads=1, latency_queries=20)
    assert res["retriever"] == "faiss-hnsw" and "flat" in res["overlap_reference"]
    assert 0.9 <= res["overlap@10"] <= 1.0 and res["nnz"] is None and res["index_bytes"] > 0
    assert res["faiss_params"]["hnsw_m"] == 8


def test_eval_run_ranks_any_model_exactly(bd: Board, tmp_path: Path) -> None:
    from tests.test_indexing import quiet_train

    a2a = quiet_train(
        bd.ds,
        "all-to-all",
        [*SMALL, "model.token_dim=16", "model.interaction_hidden=8", "train.max_steps=5"],
        tmp_path / "runs",
    )
    for run in (bd.runs["popularity"], a2a, bd.runs["two-tower"]):
        res = evaluate_run(run, bd.ds, "test", threads=1, latency_queries=10)
        stored = json.loads((run / "results.json").read_text())["test"]
        for k in ("recall@20", "ndcg@20", "recall@50", "ndcg@50"):
            assert res[k] == pytest.approx(stored[k], abs=1e-12), (run.name, k)
        assert res["retriever"] == "exact" and res["timing_includes_encoding"] is True
        assert (run / "metrics.json").is_file() and (run / "results.md").is_file()


def test_save_topk_recomputes_the_metrics(bd: Board, tmp_path: Path) -> None:
    out = tmp_path / "sp"
    build_index(bd.runs["sparcode"], out, ds=bd.ds, max_per_code=5, progress=False)
    res = evaluate_index(out, bd.ds, "test", (5, 20), threads=1, save_topk=tmp_path / "t.parquet")
    again = recompute(tmp_path / "t.parquet", bd.ds, "test", (5, 20))
    for k, v in again.items():
        if not k.startswith("list_len"):
            assert res[k] == pytest.approx(v, abs=1e-12), k
    df = pl.read_parquet(tmp_path / "t.parquet")
    assert df["rank"].min() == 1 and df["user"].dtype == pl.String and df["score"].min() > 0
    assert res["mean_list_len"] <= 20 and res["overlap@20"] <= 1.0


def test_option_and_dataset_errors(bd: Board, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="comma-separated"):
        parse_ks("20,x")
    with pytest.raises(UserError):
        parse_ks("0")
    assert parse_ks("50, 20,20") == (20, 50)
    out = tmp_path / "tt"
    build_index(bd.runs["two-tower"], out, ds=bd.ds, progress=False)
    other = Dataset(**{**bd.ds.__dict__, "data_hash": "something-else"})
    with pytest.raises(UserError, match="data hash mismatch"):
        evaluate_index(out, other)
    with pytest.raises(UserError, match="--split"):
        evaluate_index(out, bd.ds, split="train")
    with pytest.raises(UserError, match="does not exist"):
        evaluate_index(tmp_path / "missing", bd.ds)
    assert _cli(["eval"]) == 2
    assert _cli(["eval", "--index", str(out), "--run", str(out)]) == 2


def _topk_recompute_check(metrics: dict[str, Any], topk: Path, ds: Dataset) -> None:
    again = recompute(topk, ds, metrics["split"], tuple(metrics["ks"]))
    for k in ("recall@20", "ndcg@20", "recall@50", "ndcg@50", "hitrate@20", "precision@50"):
        assert metrics[k] == pytest.approx(again[k], abs=1e-12), k


@pytest.mark.e2e
def test_cli_train_index_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sparcode_cli.data.store import load_dataset
    from tests.synthetic import group_table

    csv = write_csv(
        group_table(n_groups=8, users_per_group=12, items_per_group=10, seq_len=12), tmp_path / "g.csv"
    )
    runs = tmp_path / "runs"
    for model, sets, index_opts in (
        ("sparcode", SPARCODE, []),
        ("two-tower", SMALL, ["--faiss", "hnsw", "--hnsw-m", "8"]),
    ):
        args = ["train", "--dataset", str(csv), "--model", model, "--out", str(runs), "--no-progress"]
        assert _cli(args + [f"--set={s}" for s in sets]) == 0
        (run,) = [p for p in runs.iterdir() if p.name.startswith(model)]
        out = tmp_path / f"out-{model}"
        assert _cli(["index", str(run), "--out", str(out), "--no-progress", *index_opts]) == 0
        assert "density" in capsys.readouterr().out
        topk = tmp_path / f"{model}.parquet"
        args = [
            "eval",
            "--index",
            str(out),
            "--save-topk",
            str(topk),
            "--threads",
            "1",
            "--latency-queries",
            "20",
        ]
        assert _cli(args) == 0
        printed = capsys.readouterr().out
        assert "recall@20" in printed and "batch QPS" in printed
        metrics = json.loads((out / "metrics.json").read_text())
        for f in FIELDS:
            assert f in metrics, f
        ds = load_dataset(json.loads((out / "manifest.json").read_text())["processed_dir"])
        _topk_recompute_check(metrics, topk, ds)
        if model == "sparcode":
            assert metrics["overlap@50"] == 1.0 and metrics["nnz"] > 0
        else:
            assert metrics["retriever"] == "faiss-hnsw" and metrics["overlap@50"] > 0.9


@pytest.mark.e2e
def test_cli_gru4rec_train_index_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The gru4rec encoder end to end: a two-tower, then SparCode warm-started from it, each indexed and
    evaluated from the command line."""
    from tests.synthetic import group_table

    csv = write_csv(
        group_table(n_groups=8, users_per_group=12, items_per_group=10, seq_len=12), tmp_path / "g.csv"
    )
    runs = tmp_path / "runs"
    gru = "--set=model.query_encoder=gru4rec"
    base = ["--dataset", str(csv), "--out", str(runs), "--no-progress", gru]
    assert _cli(["train", "--model", "two-tower", *base, *(f"--set={s}" for s in SMALL)]) == 0
    (tt_run,) = runs.iterdir()
    warm = [f"--set={s}" for s in SPARCODE] + ["--set=train.max_steps=40"]
    assert _cli(["train", "--model", "sparcode", *base, *warm, "--init-from", str(tt_run)]) == 0
    (sc_run,) = [p for p in runs.iterdir() if p.name.startswith("sparcode")]
    meta = json.loads((sc_run / "meta.json").read_text())
    assert meta["init_from"] == str(tt_run)
    for run in (tt_run, sc_run):
        assert 'query_encoder = "gru4rec"' in (run / "config.toml").read_text()
        out = tmp_path / f"out-{run.name}"
        assert _cli(["index", str(run), "--out", str(out), "--no-progress"]) == 0
        assert _cli(["eval", "--index", str(out), "--threads", "1", "--latency-queries", "5"]) == 0
        assert "recall@20" in capsys.readouterr().out
        metrics = json.loads((out / "metrics.json").read_text())
        assert 0 < metrics["recall@50"] <= 1
        if run is sc_run:
            assert metrics["overlap@50"] == 1.0 and metrics["nnz"] > 0
