"""Where the index build and exact scoring compute (`--device`): resolution, the clear refusals, the device
recorded in the manifest and metrics, and (with a GPU) CUDA results equal to the CPU's.

The CUDA test needs a GPU and is skipped, with its reason, where none is present; everything else runs on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sparcode_cli.devices import module_device, resolve_device
from sparcode_cli.errors import UserError
from sparcode_cli.evaluation import evaluate_run, exact_topk, load_artifact
from sparcode_cli.indexing import build_index
from sparcode_cli.models import load_checkpoint, model_from_checkpoint
from sparcode_cli.retrieval.sparse_index import overlap_at_k
from tests.cli import exit_code
from tests.test_indexing import Board, board

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def bd(tmp_path_factory: pytest.TempPathFactory) -> Board:
    return board(tmp_path_factory)


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_resolve_device_without_cuda(no_cuda: None) -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match=r"--device = 'cuda:1' but CUDA is not available") as e:
        resolve_device("cuda:1")
    assert e.value.hint == 'use "auto" or "cpu"'
    with pytest.raises(UserError, match=r"train.device = 'cuda' but CUDA"):
        resolve_device("cuda", "train.device")


def test_resolve_device_with_two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("auto") == torch.device("cuda", 0)  # always with its index, for the manifest
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match=r"--device = 'cuda:2' but this machine has 2 CUDA device\(s\)"):
        resolve_device("cuda:2")


def test_module_device() -> None:
    assert module_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert module_device(torch.nn.ReLU()) == torch.device("cpu")  # neither parameters nor buffers


def test_cli_refuses_cuda_without_it(bd: Board, tmp_path: Path, no_cuda: None, capsys) -> None:
    out = tmp_path / "out"
    assert exit_code(["index", str(bd.runs["sparcode"]), "--out", str(out), "--device", "cuda"]) == 2
    assert "--device = 'cuda' but CUDA is not available" in capsys.readouterr().err
    assert not out.exists()
    assert exit_code(["eval", "--run", str(bd.runs["popularity"]), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert exit_code(["index", str(bd.runs["sparcode"]), "--out", str(out), "--device", "gpu"]) == 2
    assert "--device" in capsys.readouterr().err and not out.exists()
    # the command's default is auto: CPU here
    args = ["index", str(bd.runs["two-tower"]), "--out", str(out), "--dataset", str(bd.csv), "--no-progress"]
    assert exit_code(args) == 0
    assert json.loads((out / "manifest.json").read_text())["device"] == "cpu"


def test_eval_index_refuses_device(tmp_path: Path, capsys) -> None:
    assert exit_code(["eval", "--index", str(tmp_path / "idx"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--device applies to --run" in err and "Traceback" not in err


def test_device_recorded(bd: Board, tmp_path: Path, no_cuda: None) -> None:
    m = build_index(bd.runs["sparcode"], tmp_path / "idx", ds=bd.ds, codes="reached", progress=False)
    assert m["device"] == "cpu"
    res = evaluate_run(
        bd.runs["popularity"], bd.ds, write=False, progress=False, latency_queries=2, repeats=1
    )
    assert res["device"] == "cpu"


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none on this machine)")
def test_cuda_build_and_exact_scoring_match_cpu(bd: Board, tmp_path: Path) -> None:
    cpu = build_index(
        bd.runs["sparcode"], tmp_path / "cpu", ds=bd.ds, codes="all", device="cpu", progress=False
    )
    gpu = build_index(
        bd.runs["sparcode"], tmp_path / "gpu", ds=bd.ds, codes="all", device="cuda", progress=False
    )
    assert gpu["device"] == "cuda:0" and cpu["device"] == "cpu"
    a, b = load_artifact(tmp_path / "cpu"), load_artifact(tmp_path / "gpu")
    saved = torch.load(tmp_path / "gpu" / "query_encoder.pt", weights_only=False)  # no map_location
    assert {t.device.type for t in saved["state_dict"].values()} == {"cpu"}  # written from CPU tensors
    # float rounding only: an entry near its row's cut may be kept on one side, with a value near 0
    np.testing.assert_allclose(b.index.matrix.toarray(), a.index.matrix.toarray(), rtol=1e-4, atol=1e-4)
    assert abs(gpu["nnz"] - cpu["nnz"]) <= 1e-3 * cpu["nnz"]
    for name in ("sparcode", "two-tower"):
        model = model_from_checkpoint(load_checkpoint(bd.runs[name]))
        es = bd.ds.test
        ref = exact_topk(model, bd.ds, es.query, es.users, 50)  # fills the model's CPU caches
        on_gpu = exact_topk(model.to("cuda"), bd.ds, es.query, es.users, 50)
        assert overlap_at_k(on_gpu, ref, 50) >= 0.99, name
        np.testing.assert_allclose(on_gpu.scores, ref.scores, rtol=1e-4, atol=1e-4)
        back = exact_topk(model.to("cpu"), bd.ds, es.query, es.users, 50)
        np.testing.assert_array_equal(back.items, ref.items)  # and back on CPU, CPU's lists exactly
    for name in ("two-tower", "sparcode", "popularity"):
        res = evaluate_run(
            bd.runs[name], bd.ds, write=False, progress=False, latency_queries=2, repeats=1, device="auto"
        )
        assert res["device"] == "cuda:0", name
