"""`make reproduce`: matrix expansion, the paired bootstrap, the report writer, and the driver end to end on a
tiny synthetic CSV (trained, indexed, evaluated, reported; then run again and found finished)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from sparcode_cli.bootstrap import align_users, paired_bootstrap
from sparcode_cli.config import load_config
from sparcode_cli.errors import UserError
from sparcode_cli.reproduce import matrix, report
from sparcode_cli.reproduce.matrix import expand
from tests.synthetic import group_table

# ------------------------------------------------------------------------------------------------ matrix


def test_reproduce_matrix_from_the_repository_toml() -> None:
    plan = expand("reproduce")
    assert plan.datasets == ["movielens"]
    by_model: dict[str, list[matrix.TrainSpec]] = {}
    for t in plan.trains:
        by_model.setdefault(t.model, []).append(t)
    seeds = plan.spec["seeds"]
    assert len(by_model["popularity"]) == 1  # deterministic: once
    assert sorted(t.seed for t in by_model["two-tower"]) == sorted(seeds)
    assert sorted(t.seed for t in by_model["all-to-all"]) == sorted(seeds)
    main_sc = [t for t in by_model["sparcode"] if not t.variant]
    assert sorted(t.seed for t in main_sc) == sorted(seeds)
    for t in by_model["sparcode"]:  # warm start from the two-tower run of the same seed and encoder
        assert t.init_from is not None and t.init_from.model == "two-tower"
        assert (t.init_from.seed, t.init_from.encoder) == (t.seed, t.encoder)
    for t in plan.trains:
        if t.model != "popularity" and not t.variant:
            budget = plan.spec["max_steps"][t.model]
            assert f"train.max_steps={budget}" in t.overrides
    cb = plan.sweeps["codebook"]
    assert len(plan.evals_of("codebook")) == len(cb["n_codewords"]) * len(cb["k_u"])
    assert len(plan.evals_of("bias")) == len(plan.sweeps["bias"]["density_factors"])
    assert len(plan.evals_of("hnsw")) == len(plan.sweeps["hnsw"]["ef_search"])
    main = plan.evals_of("main")
    n = len(seeds)
    # popularity, two-tower x faiss kinds, sparcode, all-to-all
    assert len(main) == 1 + n * len(plan.spec["faiss"]) + n + n
    assert {e.retriever for e in main} == {"exact", "flat", "hnsw", "sparse"}
    assert all(e.users == "all" for e in plan.evals)
    # every override is valid for its model (load_config raises on an unknown key)
    cfgs = {t.key: load_config(t.model, overrides=list(t.overrides)) for t in plan.trains}
    points = [t for t in by_model["sparcode"] if t.variant]
    steps = int(cb["max_steps"]) or plan.spec["max_steps"]["sparcode"]
    for t in points:
        assert cfgs[t.key]["train"]["max_steps"] == steps
        assert all(o in t.overrides for o in cb["set"])
    # with the main budget and no extra settings, the N=64, K_u=4 point is the seed-0 main run's config
    raw = matrix.load_toml()
    raw["sweep"]["codebook"].update(max_steps=0, set=[])
    plan2 = expand("reproduce", raw=raw)
    point = next(t for t in plan2.trains if dict(t.variant) == {"n_codewords": 64, "k_u": 4})
    main0 = next(t for t in plan2.trains if t.model == "sparcode" and not t.variant and t.seed == point.seed)
    assert load_config("sparcode", overrides=list(point.overrides)) == load_config(
        "sparcode", overrides=list(main0.overrides)
    )


def test_reproduce_full_adds_encoders_interactions_and_the_gowalla_sample() -> None:
    plan = expand("reproduce-full", datasets=["movielens", "gowalla"])
    assert plan.datasets == ["movielens", "gowalla"]
    sc = [t for t in plan.trains if t.model == "sparcode" and not t.variant]
    assert {(t.encoder, t.interaction) for t in sc} == {
        (e, i) for e in ("dnn", "sasrec") for i in ("mlp", "attention")
    }
    assert plan.spec["eval_users"] == {"gowalla": 2000}
    g_main = plan.evals_of("main", "gowalla")
    assert g_main and all(e.users == "sample" for e in g_main)
    g_all = plan.evals_of("main-all", "gowalla")
    assert g_all and all(e.users == "all" and e.train.model != "all-to-all" for e in g_all)
    assert not plan.evals_of("main-all", "movielens")
    assert all(e.users == "all" for e in plan.evals_of("main", "movielens"))
    # dataset_max_steps: gowalla's own two-tower budget; every other run keeps the matrix's budget
    steps = {
        (t.dataset, t.model): o
        for t in plan.trains
        if not t.variant
        for o in t.overrides
        if o.startswith("train.max_steps=")
    }
    g_tt = plan.spec["dataset_max_steps"]["gowalla"]["two-tower"]
    assert g_tt != plan.spec["max_steps"]["two-tower"]
    assert steps[("gowalla", "two-tower")] == f"train.max_steps={g_tt}"
    assert steps[("movielens", "two-tower")] == f"train.max_steps={plan.spec['max_steps']['two-tower']}"
    assert steps[("gowalla", "sparcode")] == f"train.max_steps={plan.spec['max_steps']['sparcode']}"


def test_dataset_set_reaches_that_datasets_runs_only() -> None:
    raw = {
        "m": {
            "datasets": ["a", "b"],
            "models": ["two-tower", "sparcode"],
            "set": ["train.epochs=9"],
            "dataset_set": {"a": {"two-tower": ["model.user_id=true", "train.lr=0.002"]}},
        }
    }
    plan = expand("m", raw=raw)
    ov = {(t.dataset, t.model): t.overrides for t in plan.trains}
    assert ov[("a", "two-tower")][:3] == ("train.epochs=9", "model.user_id=true", "train.lr=0.002")
    for key in (("b", "two-tower"), ("a", "sparcode"), ("b", "sparcode")):
        assert not any("user_id" in o or "train.lr" in o for o in ov[key]), key


def test_a_dataset_can_sweep_its_own_codebook_grid() -> None:
    raw = {
        "m": {"datasets": ["a", "b"], "models": ["two-tower", "sparcode"], "sweeps": ["codebook"]},
        "sweep": {
            "codebook": {
                "n_codewords": [16, 64],
                "k_u": [1, 4],
                "max_steps": 50,
                "datasets": {"b": {"n_codewords": [1024, 4096, 16384], "k_u": [1], "max_steps": 0}},
            }
        },
    }
    plan = expand("m", raw=raw)
    grid = {
        d: sorted(
            (dict(t.variant)["n_codewords"], dict(t.variant)["k_u"])
            for t in plan.trains
            if t.dataset == d and t.variant
        )
        for d in ("a", "b")
    }
    assert grid["a"] == [(16, 1), (16, 4), (64, 1), (64, 4)]
    assert grid["b"] == [(1024, 1), (4096, 1), (16384, 1)]
    budgets = {
        t.dataset: [o for o in t.overrides if o.startswith("train.max_steps")]
        for t in plan.trains
        if t.variant
    }
    assert budgets == {"a": ["train.max_steps=50"], "b": []}  # b: max_steps 0 = the main budget (none here)
    raw["sweep"]["codebook"]["datasets"]["b"]["codewords"] = [8]
    with pytest.raises(UserError, match=r"sweep\.codebook\.datasets\.b.*codewords"):
        expand("m", raw=raw)


def test_the_repository_sweeps_gowallas_flat_codebook() -> None:
    plan = expand("reproduce-full", datasets=["gowalla"])
    main = next(t for t in plan.trains if t.model == "sparcode" and not t.variant and t.interaction == "mlp")
    assert {"model.m=1", "model.n_codewords=16384", "model.k_u=1"} <= set(main.overrides)
    sweep = sorted(dict(t.variant)["n_codewords"] for t in plan.trains if t.variant)
    assert sweep == [1024, 4096, 16384]
    target = expand("target", datasets=["gowalla"])
    same = next(t for t in target.trains if t.model == "sparcode" and t.seed == 0 and t.encoder == "dnn")
    assert same.overrides == main.overrides  # target's seed 0 is reproduce-full's run, reused


def test_each_matrix_reports_into_its_own_folder() -> None:
    """reproduce-full's movielens.md must not overwrite `make reproduce`'s (the README's table)."""
    folders = {
        m: expand(m, datasets=["movielens"]).settings["results"] for m in ("reproduce", "reproduce-full")
    }
    assert folders["reproduce"] == "experiments/results"
    assert folders["reproduce-full"] != folders["reproduce"]


def test_reproduce_full_reuses_the_model_table_runs() -> None:
    """Same budgets and settings as the `models` matrix: its runs are the full matrix's, not trained twice
    (for the encoders both matrices have; the model table alone also has gru4rec)."""
    full = expand("reproduce-full", datasets=["movielens-100k"])
    models = expand("models", datasets=["movielens-100k"])
    shared = set(full.spec["encoders"]) & set(models.spec["encoders"])
    assert {"dnn", "sasrec"} <= shared and "gru4rec" in models.spec["encoders"]
    configs = {(t.key, tuple(sorted(t.overrides))) for t in full.trains if not t.variant}
    assert {
        (t.key, tuple(sorted(t.overrides))) for t in models.trains if t.encoder in {None, *shared}
    } <= configs


def test_matrix_errors_name_the_bad_key() -> None:
    raw = {"reproduce": {"datasets": ["x"], "modles": []}}
    with pytest.raises(UserError, match="modles"):
        expand("reproduce", raw=raw)
    with pytest.raises(UserError, match="unknown model"):
        expand("reproduce", raw={"reproduce": {"datasets": ["x"], "models": ["bert"]}})
    with pytest.raises(UserError, match="no matrix"):
        expand("nope", raw={"reproduce": {}})
    bad_budget = {"reproduce": {"datasets": ["x"], "dataset_max_steps": {"x": {"bert": 5}}}}
    with pytest.raises(UserError, match="dataset_max_steps.x"):
        expand("reproduce", raw=bad_budget)
    for bad_set in ({"x": {"bert": ["train.lr=1"]}}, {"x": {"two-tower": "train.lr=1"}}):
        with pytest.raises(UserError, match="dataset_set.x"):
            expand("reproduce", raw={"reproduce": {"datasets": ["x"], "dataset_set": bad_set}})
    assert matrix.dataset_label("data/my file.csv") == "my file"
    assert matrix.dataset_label("movielens-1m") == "movielens-1m"


# ------------------------------------------------------------------------------------------------ bootstrap


def test_bootstrap_identical_arrays_give_zero() -> None:
    a = np.random.default_rng(0).random(300)
    r = paired_bootstrap(a, a.copy(), n_boot=500, seed=1)
    assert (r.diff, r.low, r.high) == (0.0, 0.0, 0.0)
    assert r.verdict == "no detectable difference"


def test_bootstrap_constant_shift_is_that_shift() -> None:
    b = np.random.default_rng(0).random(200)
    r = paired_bootstrap(b + 0.25, b, n_boot=500, seed=0)
    assert r.low == pytest.approx(0.25) and r.high == pytest.approx(0.25) and r.diff == pytest.approx(0.25)
    assert r.verdict == "a > b" and r.prob_positive == 1.0
    assert paired_bootstrap(b - 0.1, b, n_boot=100).verdict == "a < b"


def test_bootstrap_interval_matches_the_normal_approximation_and_is_seeded() -> None:
    rng = np.random.default_rng(3)
    b = rng.random(2000)
    a = b + rng.normal(0.01, 0.1, size=2000)
    r1 = paired_bootstrap(a, b, n_boot=2000, seed=7)
    r2 = paired_bootstrap(a, b, n_boot=2000, seed=7)
    assert r1 == r2
    d = a - b
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    assert r1.low == pytest.approx(d.mean() - half, abs=0.2 * half)
    assert r1.high == pytest.approx(d.mean() + half, abs=0.2 * half)


def test_bootstrap_averages_seeds_and_drops_nan_users() -> None:
    a = np.array([[0.2, 0.4, np.nan], [0.4, 0.6, 0.1]])  # (seeds, users); user 2 has no targets in seed 0
    b = np.array([[0.1, 0.1, 0.1], [0.1, 0.1, 0.1]])
    r = paired_bootstrap(a, b, n_boot=50)
    assert r.n_users == 2
    assert r.diff == pytest.approx(np.mean([0.3 - 0.1, 0.5 - 0.1]))
    users, va, vb = align_users(
        np.array([5, 1, 3]), np.array([50.0, 10.0, 30.0]), np.array([3, 5]), np.array([3.0, 5.0])
    )
    assert users.tolist() == [3, 5] and va.tolist() == [30.0, 50.0] and vb.tolist() == [3.0, 5.0]
    with pytest.raises(ValueError):
        paired_bootstrap(np.zeros(3), np.zeros(4))


# ------------------------------------------------------------------------------------------------ report


def _fake_cell(tmp: Path, model: str, retriever: str, seed: int, recall: np.ndarray, **kw) -> dict:
    tag = "".join(
        ch
        for ch in f"{kw.get('table', 'main')}{kw.get('options', '')}{kw.get('variant', '')}"
        if ch.isalnum()
    )
    run = tmp / f"{model}-{retriever}-{seed}-{tag}"
    run.mkdir(parents=True, exist_ok=True)
    users = np.arange(1, len(recall) + 1)
    np.savez(
        run / "results_per_user.npz",
        **{"test.users": users, "test.recall@20": recall, "test.recall@50": recall},
    )
    (run / "results.json").write_text(json.dumps({"train_time_s": 10.0 + seed, "status": "max-steps"}))
    m = {
        "recall@20": float(recall.mean()),
        "recall@50": float(recall.mean()) + 0.1,
        "ndcg@20": 0.05,
        "ndcg@50": 0.06,
        "qps_batch": 2000.0 + seed,
        "qps_batch_1t": 1000.0 + seed,
        "threads": 2,
        "n_users": len(recall),
        "overlap@50": 1.0,
        "index_bytes": 2**20 if retriever != "exact" else None,
        "density": 0.05 if retriever == "sparse" else None,
        "timing_includes_encoding": retriever == "exact",
        **kw.pop("metrics", {}),
    }
    return {
        "table": kw.pop("table", "main"),
        "key": retriever,
        "retriever": retriever,
        "options": kw.pop("options", {}),
        "dataset": "fake",
        "model": model,
        "label": model,
        "encoder": None if model == "popularity" else "dnn",
        "interaction": "mlp" if model in ("sparcode", "all-to-all") else None,
        "seed": seed,
        "variant": kw.pop("variant", {}),
        "run_id": run.name,
        "run_dir": str(run),
        "metrics": m,
        "manifest": kw.pop("manifest", {}),
        "train": {"train_time_s": 10.0 + seed},
    }


def test_report_writer_on_fake_results(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = rng.random(100)
    cells = [_fake_cell(tmp_path, "popularity", "exact", 0, base * 0.5)]
    for s in (0, 1, 2):
        cells.append(_fake_cell(tmp_path, "two-tower", "flat", s, base))
        cells.append(_fake_cell(tmp_path, "two-tower", "hnsw", s, base))
        sparse_metrics = {"probes": 4, "qps_batch_1t": 3000.0 + s}
        cells.append(
            _fake_cell(tmp_path, "sparcode", "sparse", s, np.clip(base + 0.05, 0, 1), metrics=sparse_metrics)
        )
        cells.append(_fake_cell(tmp_path, "all-to-all", "exact", s, np.clip(base + 0.1, 0, 1)))
    for f, d in ((1.0, 0.05), (0.5, 0.025), (0.25, 0.0125)):
        cells.append(
            _fake_cell(
                tmp_path,
                "sparcode",
                "sparse",
                0,
                base * (0.5 + d * 10),
                table="bias",
                options={"density_factor": f},
                metrics={"density": d, "qps_batch_1t": 1000 / d},
                manifest={"bias": -f, "nnz": int(d * 1e5), "build_s": 0.1},
            )
        )
    for n in (16, 64):
        for k in (1, 4):
            cells.append(
                _fake_cell(
                    tmp_path,
                    "sparcode",
                    "sparse",
                    0,
                    base * k / 4,
                    table="codebook",
                    variant={"n_codewords": n, "k_u": k},
                    manifest={"n_codes_built": n * k, "n_codes_universe": n * n, "build_s": 0.2},
                )
            )
    for ef in (16, 64):
        cells.append(
            _fake_cell(tmp_path, "two-tower", "hnsw", 0, base, table="hnsw", options={"ef_search": ef})
        )
    plan = expand(
        "reproduce", raw={"reproduce": {"datasets": ["fake"], "seeds": [0, 1, 2], "models": ["popularity"]}}
    )
    info = {
        "wall_s": 90.0,
        "trained_now": 3,
        "reused": 1,
        "machine": {"cores": 2},
        "max_steps": {"two-tower": 5},
    }
    md = report.write_report("fake", cells, plan, info, tmp_path / "results")
    text = md.read_text()
    assert "## Main table" in text and "| sparcode (mlp) | dnn | sparse code index, 4 probes | 3 |" in text
    # the speed claim pairs each sparse index with Faiss flat over the same encoder's two-tower
    assert "Faiss flat search (DESIGN §7) (sparcode (mlp), dnn) | **agrees** |" in text
    assert "sparse 3,001 vs flat 1,001 (3.00x)" in text
    assert "±" in text and "QPS 2 thr" in text
    assert "sparcode (mlp) − two-tower" in text and "sparcode (mlp) better" in text
    assert "## Sparsity sweep" in text and "1 (trained)" in text
    assert "## Codebook sweep" in text and "| 64 | 4 | 256 / 4,096 |" in text
    assert "HNSW efSearch 16" in text and "26.53" in text  # the paper's table beside ours
    for png in ("fake-sparsity.png", "fake-codebook.png", "fake-operating-points.png"):
        assert (tmp_path / "results" / png).stat().st_size > 1000
    summary = json.loads((tmp_path / "results" / "fake.json").read_text())
    b = summary["bootstrap"][0]["recall@20"]
    assert b["low"] > 0 and b["diff"] == pytest.approx(np.mean(np.clip(base + 0.05, 0, 1) - base))


# ------------------------------------------------------------------------------------------------ end to end

SMALL = ["model.dim=16", "model.emb_dim=16", "model.hidden=32"]
TINY_TOML = """
[settings]
out = "{out}"
results = "{results}"
jobs = 1
train_threads = 1
eval_threads = 1
latency_queries = 3
bootstrap_samples = 100

[reproduce]
datasets = ["{csv}"]
models = ["popularity", "two-tower", "sparcode", "all-to-all"]
encoders = ["dnn"]
interactions = ["mlp"]
faiss = ["flat", "hnsw"]
seeds = [0]
sweeps = ["bias", "codebook", "hnsw"]
set = ["model.max_history=8", "train.batch_size=64", "train.n_negatives=32", "train.lr=0.01", "train.epochs=50"]

[reproduce.model_set]
two-tower = {small}
sparcode = {sc}
all-to-all = {a2a}

[reproduce.max_steps]
two-tower = 12
sparcode = 8
all-to-all = 6

[sweep.bias]
density_factors = [1.0, 0.5]

[sweep.codebook]
n_codewords = [8]
k_u = [1, 4]

[sweep.hnsw]
ef_search = [16]
"""


def _tiny(tmp_path: Path) -> Path:
    ds = group_table(n_groups=6, users_per_group=6, items_per_group=8, seq_len=8, n_targets=2)
    lines = ["user,item,timestamp"]
    for u in range(1, ds.n_users + 1):
        seq = np.concatenate([ds.train.row(u), ds.valid.targets.row(u - 1), ds.test.targets.row(u - 1)])
        lines += [f"u{u},i{i},{t}" for t, i in enumerate(seq.tolist())]
    csv = tmp_path / "tiny.csv"
    csv.write_text("\n".join(lines) + "\n")
    sc = [
        *SMALL,
        "model.token_dim=16",
        "model.n_codewords=8",
        "model.interaction_hidden=8",
        "model.density_warmup=4",
    ]
    a2a = [*SMALL, "model.token_dim=16", "model.interaction_hidden=8"]
    toml = tmp_path / "reproduce.toml"
    toml.write_text(
        TINY_TOML.format(
            out=tmp_path / "runs",
            results=tmp_path / "results",
            csv=csv,
            small=json.dumps(SMALL),
            sc=json.dumps(sc),
            a2a=json.dumps(a2a),
        )
    )
    return toml


@pytest.mark.e2e
def test_driver_end_to_end_then_resumes_without_redoing(tmp_path: Path) -> None:
    import io

    from sparcode_cli.reproduce.runner import run_plan

    toml = _tiny(tmp_path)
    console = Console(file=io.StringIO())
    plan = expand("reproduce", config=toml)
    first = run_plan(plan, console=console)
    assert not first.failures, first.failures
    # the N=8, K_u=4 sweep point is the seed-0 main run: one run, not two
    assert len(first.jobs) == len({j.run_id for j in first.jobs}) == len(plan.trains) - 1
    assert all(j.status == "done" for j in first.jobs)
    for j in first.jobs:  # the run id predicted up front is the one the trainer gave
        assert (j.run_dir / "results.json").is_file() and j.run_dir.name == j.run_id
    md = tmp_path / "results" / "tiny.md"
    text = md.read_text()
    assert "## Main table" in text and "## Paired bootstrap over users" in text
    assert "## Sparsity sweep" in text and "## Codebook sweep" in text and "## Operating points" in text
    assert len(first.cells) == len(plan.evals)
    sparse = [c for c in first.cells if c["retriever"] == "sparse" and c["table"] == "main"]
    assert all(c["metrics"]["overlap@50"] == 1.0 for c in sparse)  # the index serves the model's own scores

    stamps = {j.run_id: (j.run_dir / "checkpoint_best.pt").stat().st_mtime_ns for j in first.jobs}
    cells = sorted(p for p in (tmp_path / "runs").glob("*/cells/*.json"))
    cell_stamps = [p.stat().st_mtime_ns for p in cells]
    second = run_plan(expand("reproduce", config=toml), console=console)
    assert all(j.status == "reused" for j in second.jobs)
    assert {j.run_id: (j.run_dir / "checkpoint_best.pt").stat().st_mtime_ns for j in second.jobs} == stamps
    assert [p.stat().st_mtime_ns for p in cells] == cell_stamps  # no cell re-evaluated
    assert len(second.cells) == len(first.cells)
    assert md.read_text().split("## Main table")[1] == text.split("## Main table")[1]

    # provenance: the report names the commit, the code digest and the processed data it came from
    from sparcode_cli.provenance import code_digest

    info = json.loads((tmp_path / "results" / "tiny.json").read_text())["info"]
    assert info["code_digest"] == code_digest() and "git_commit" in info
    ((data,),) = info["data"].values()
    assert data["data_hash"].startswith("tiny-") and len(data["content_digest"]) == 16
    assert f"(code digest {code_digest()})" in text and f"content digest `{data['content_digest']}`" in text

    # runs and cells made by other code are set aside, never reused
    from sparcode_cli.reproduce import jobs as jobs_module
    from sparcode_cli.reproduce.runner import resolve
    from sparcode_cli.training import trainer

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "code_digest", lambda: "other-code")
        mp.setattr(jobs_module, "code_digest", lambda: "other-code")
        assert jobs_module.read_cell(cells[0]) is None
        stale, _ = resolve(expand("reproduce", config=toml), None, tmp_path / "runs")
    assert all(j.status == "queued" and "moved to" in j.note for j in stale)
    assert not any(j.run_dir.exists() for j in stale)
    assert len(list((tmp_path / "runs" / "stale").iterdir())) == len(stale)


def test_order_aware_encoders_are_skipped_on_unordered_data(tmp_path: Path) -> None:
    """sasrec and gru4rec runs (and the runs warm-started from them) are skipped, each saying why; dnn runs."""
    from sparcode_cli.reproduce.runner import resolve

    ds = group_table(n_groups=4, users_per_group=4, items_per_group=8, seq_len=8, n_targets=2)
    lines = ["user,item"]  # no timestamps: unordered
    for u in range(1, ds.n_users + 1):
        seq = np.concatenate([ds.train.row(u), ds.valid.targets.row(u - 1), ds.test.targets.row(u - 1)])
        lines += [f"u{u},i{i}" for i in seq.tolist()]
    csv = tmp_path / "bag.csv"
    csv.write_text("\n".join(lines) + "\n")
    raw = {
        "settings": {"out": str(tmp_path / "runs"), "results": str(tmp_path / "results")},
        "reproduce": {
            "datasets": [str(csv)],
            "models": ["two-tower", "sparcode"],
            "encoders": ["dnn", "sasrec", "gru4rec"],
            "interactions": ["mlp"],
            "seeds": [0],
            "warm_start": True,
            "sweeps": [],
        },
    }
    plan = expand("reproduce", raw=raw)
    jobs, _ = resolve(plan, None, tmp_path / "runs")
    by = {(j.spec.model, j.spec.encoder): j for j in jobs}
    assert {k for k, j in by.items() if j.status == "skipped"} == {
        (m, e) for m in ("two-tower", "sparcode") for e in ("sasrec", "gru4rec")
    }
    for e in ("sasrec", "gru4rec"):
        assert by[("two-tower", e)].note == f"bag is unordered: {e} reads order"
    assert by[("two-tower", "dnn")].status == by[("sparcode", "dnn")].status == "queued"


def test_only_all_to_all_validates_on_the_eval_users_sample(tmp_path: Path) -> None:
    from sparcode_cli.reproduce.runner import TrainJob, _payload

    plan = expand("reproduce-full", datasets=["gowalla"])
    seen = set()
    for spec in plan.trains:
        if spec.model in seen:
            continue
        seen.add(spec.model)
        job = TrainJob(spec, {}, "rid", tmp_path / "rid", tmp_path, 2000, None)
        payload = _payload(job, plan, tmp_path)
        assert payload["sample"] == (2000 if spec.model == "all-to-all" else 0), spec.model
    assert {"two-tower", "sparcode", "all-to-all"} <= seen
