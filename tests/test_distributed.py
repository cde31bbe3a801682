"""torch.distributed: 2 CPU processes over gloo (tests/distributed_worker.py under torchrun) against one process.

One torchrun job per module trains a two-tower and a SparCode model, stops and resumes one, builds a sharded
index and evaluates it sharded; the tests compare what it left with the same work done here in one process.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rich.console import Console

from sparcode_cli.evaluation import evaluate_index, evaluate_run
from sparcode_cli.indexing import build_index
from sparcode_cli.models import load_checkpoint
from sparcode_cli.training.trainer import train
from tests.distributed_worker import FROZEN, cfg
from tests.synthetic import checkerboard, write_csv

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")
METRICS = ("recall@20", "ndcg@20", "recall@50", "ndcg@50")


def torchrun(*args: str, nproc: int = 2, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("ddp")
    proc = torchrun("tests/distributed_worker.py", str(out), env={"SPARCODE_HOME": str(out / "home")})
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {"out": out, "rank0": ranks[0], "rank1": ranks[1]}


@pytest.fixture(scope="module")
def ds() -> Any:
    return checkerboard()


def one_process(ds: Any, model: str, out: Path, *extra: str) -> Any:
    return train(ds, cfg(model, *extra), out, console=Console(file=io.StringIO()), progress=False)


def logged_losses(run_dir: str | Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def state(run_dir: str | Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(Path(run_dir) / "checkpoint_last.pt")["state_dict"]


def test_ddp_steps_equal_one_process_steps_at_the_same_global_batch(
    job: dict[str, Any], ds: Any, tmp_path: Path
) -> None:
    ddp = job["rank0"]["two_tower"]
    ref = one_process(ds, "two-tower", tmp_path)
    assert ddp["steps"] == ref.steps == 38  # 2 epochs of 19 batches of 63 (the ranks' slices: 32 and 31)
    assert_states_close(state(ddp["run"]), state(ref.run_dir), atol=2e-4)
    # the logged loss is the global batch's
    np.testing.assert_allclose(logged_losses(ddp["run"]), [h["loss"] for h in ref.history], rtol=1e-4)
    for k in METRICS:  # sharded validation and test give the one-process numbers
        assert ddp["test"][k] == pytest.approx(ref.test[k], abs=1e-9), k


def test_ddp_sparcode_codebooks_follow_the_global_batch_like_one_process(
    job: dict[str, Any], ds: Any, tmp_path: Path
) -> None:
    """k-means of the gathered first quantized batch, all-reduced EMA statistics, restarts drawn from the
    global batch: with the weights held still, 35 quantized steps give one process's codebooks."""
    ddp = job["rank0"]["sparcode_frozen"]
    ref = one_process(ds, "sparcode", tmp_path, *FROZEN)
    a, b = state(ddp["run"]), state(ref.run_dir)
    assert bool(a["quantizer.initted"]) and not torch.equal(a["quantizer.codebooks"], state_at_init(ds))
    # a token on a codeword boundary may land on the other side by float noise: an EMA count moves by 0.01
    ema = {k for k in a if k.startswith("quantizer.ema_")}
    assert_states_close({k: a[k] for k in a if k not in ema}, {k: b[k] for k in b if k not in ema}, atol=1e-5)
    assert_states_close({k: a[k] for k in ema}, {k: b[k] for k in ema}, atol=0.05)
    assert ddp["test"] == ref.test
    np.testing.assert_allclose(logged_losses(ddp["run"]), [h["loss"] for h in ref.history], rtol=1e-6)


def test_ddp_sparcode_trains_like_one_process(job: dict[str, Any], ds: Any, tmp_path: Path) -> None:
    # Trained for real, the runs part by float noise that Adam scales up (see FROZEN); the loss stays close
    ddp = job["rank0"]["sparcode"]
    ref = one_process(ds, "sparcode", tmp_path)
    assert ddp["steps"] == ref.steps == 38
    np.testing.assert_allclose(logged_losses(ddp["run"]), [h["loss"] for h in ref.history], rtol=2e-3)


def assert_states_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-3, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


def state_at_init(ds: Any) -> torch.Tensor:
    from sparcode_cli.models import build_model
    from sparcode_cli.models.base import DataContext

    c = cfg("sparcode")
    return build_model("sparcode", c["model"], DataContext.from_dataset(ds)).state_dict()[
        "quantizer.codebooks"
    ]


def test_every_rank_holds_the_same_parameters_and_codebooks_after_every_step(job: dict[str, Any]) -> None:
    d0, d1 = job["rank0"]["digests"], job["rank1"]["digests"]
    for model in ("two-tower", "sparcode"):
        # two full runs (38 steps each) for sparcode, plus the stopped (7) and resumed (31) one
        assert len(d0[model]) == (38 if model == "two-tower" else 2 * 38 + 7 + 31)
        assert d0[model] == d1[model], model


def test_a_run_resumed_under_ddp_continues_exactly(job: dict[str, Any]) -> None:
    full, resumed = job["rank0"]["sparcode"], job["rank0"]["resumed"]
    assert Path(full["run"]).name == Path(resumed["run"]).name and resumed["steps"] == 38
    a, b = state(full["run"]), state(resumed["run"])
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["test"] == full["test"]
    meta = json.loads((Path(resumed["run"]) / "meta.json").read_text())
    assert meta["world_size"] == 2 and len(meta["resumed"]) == 1


def test_the_sharded_index_is_bit_identical_to_the_one_process_build(
    job: dict[str, Any], ds: Any, tmp_path: Path
) -> None:
    from sparcode_cli.retrieval.sparse_index import CodeIndex

    one = build_index(job["rank0"]["sparcode"]["run"], tmp_path / "index", ds=ds, codes="all", progress=False)
    sharded = json.loads((job["out"] / "index" / "manifest.json").read_text())
    assert sharded["world_size"] == 2 and sharded["nnz"] == one["nnz"] > 0
    a, b = CodeIndex.load(job["out"] / "index"), CodeIndex.load(tmp_path / "index")
    assert np.array_equal(a.code_ids, b.code_ids) and len(a.code_ids) == 64
    for name in ("indptr", "indices", "data"):
        x, y = getattr(a.matrix, name), getattr(b.matrix, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name


def test_a_rank_failing_in_the_index_build_fails_every_rank_and_publishes_nothing(
    job: dict[str, Any],
) -> None:
    assert job["rank1"]["failed_build"].startswith("the shard's scoring failed (injected)")
    assert job["rank0"]["failed_build"].startswith(
        "rank 1 of 2 failed: the shard's scoring failed (injected)"
    )
    assert not (job["out"] / "failed").exists()
    assert not [p for p in job["out"].iterdir() if p.name.startswith(".failed")]  # no temporary folder left


def test_sharded_evaluation_equals_one_process(job: dict[str, Any], ds: Any) -> None:
    idx = evaluate_index(job["out"] / "index", ds, write=False, progress=False)
    run = evaluate_run(job["rank0"]["two_tower"]["run"], ds, write=False, progress=False, batch_size=16)
    for ref, got in ((idx, job["rank0"]["index_eval"]), (run, job["rank0"]["run_eval"])):
        assert got["world_size"] == 2 and got["n_users"] == ref["n_users"] == 128
        for k in (*METRICS, "hitrate@20", "list_len@50"):
            assert got[k] == ref[k], k
    assert job["rank1"]["index_eval"] is None  # rank 0 reports


def test_train_nproc_2_runs_torchrun_end_to_end(tmp_path: Path) -> None:
    csv = write_csv(checkerboard(), tmp_path / "interactions.csv")
    env = {**os.environ, "SPARCODE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    args = [
        "train",
        "--dataset",
        str(csv),
        "--model",
        "two-tower",
        "--out",
        str(tmp_path / "runs"),
        "--no-progress",
    ]
    sets = ["model.dim=8", "model.emb_dim=8", "model.hidden=16", "train.batch_size=64", "train.epochs=1"]
    args += [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(
        [sys.executable, "-m", "sparcode_cli", *args, "--nproc", "2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run,) = (tmp_path / "runs").iterdir()
    assert json.loads((run / "meta.json").read_text())["world_size"] == 2
    assert (run / "results.json").is_file() and proc.stdout.count("recall@20") == 1  # rank 0 prints


def test_a_failing_rank_fails_the_job_with_one_clear_message(tmp_path: Path) -> None:
    csv = write_csv(checkerboard(), tmp_path / "interactions.csv")
    env = {**os.environ, "SPARCODE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    args = ["train", "--dataset", str(csv), "--model", "two-tower", "--out", str(tmp_path / "runs")]
    proc = subprocess.run(
        [sys.executable, "-m", "sparcode_cli", *args, "--set", "train.batch_size=1", "--nproc", "2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2
    assert "[rank 0] error: train.batch_size = 1 is smaller than the 2 processes" in proc.stderr
