"""The work of one matrix cell: prepare data, train a run (resumably), build an index and evaluate it.

Every function here calls the library in-process (trainer, indexing, evaluation); the runner decides where
and when. A training run is a normal run folder `<out>/<run-id>/`; an evaluated cell is cached as
`<out>/<run-id>/cells/<split>-<users>-<key>.json`, and its index artifact lives in `<out>/<run-id>/indexes/<key>/`.

    folder = prepare_dataset("movielens", data_cfg, mirror=None)
    rid = expected_run_id(cfg, ds, init_run_id)            # the id `train` will give the run
    summary = train_job(payload)                            # picklable: runs in a worker process too
    cell = evaluate_cell(spec, run_dir, ds, settings)       # -> the cached cell dict
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from sparcode_cli.atomic import write_json
from sparcode_cli.config import load_config, run_id
from sparcode_cli.data.dataset import Dataset, EvalSplit
from sparcode_cli.provenance import code_digest
from sparcode_cli.reproduce.matrix import EvalSpec

CELLS = "cells"
INDEXES = "indexes"
BIG_BIAS = 1000.0  # bias-sweep probe: g + BIG > 0 for (almost) every pair, so the table shows g itself
BIAS_PROBE_CODES = 256

_DATASETS: dict[tuple[str, int, int], Dataset] = {}  # per process: folder, sample size, seed -> Dataset


# ------------------------------------------------------------------------------------------------ data
def prepare_dataset(name: str, data_cfg: dict[str, Any], mirror: str | None = None) -> Path:
    """The processed folder of `name` (a registry name or a CSV / Parquet path) with the run's [data] params."""
    from sparcode_cli.data.preprocess import prepare
    from sparcode_cli.indexing import prepare_params

    return prepare(name, mirror=mirror, progress=False, **prepare_params(data_cfg))


def sample_split(es: EvalSplit, n: int, seed: int) -> EvalSplit:
    """A fixed seeded sample of `n` users of a split (all of them when it has no more)."""
    from sparcode_cli.evaluation import take_rows

    if n <= 0 or len(es.users) <= n:
        return es
    rows = np.sort(np.random.default_rng(seed).choice(len(es.users), size=n, replace=False))
    return EvalSplit(es.name, es.users[rows], take_rows(es.query, rows), take_rows(es.targets, rows))


def load(folder: str | Path, sample: int = 0, seed: int = 0) -> Dataset:
    """The dataset of a processed folder, optionally with validation and test cut to a seeded user sample
    (same data hash: the sample changes what is scored, not what is trained on)."""
    from sparcode_cli.data.store import load_dataset

    key = (str(folder), int(sample), int(seed))
    if key not in _DATASETS:
        full = _DATASETS.get((str(folder), 0, 0)) or load_dataset(folder)
        _DATASETS[(str(folder), 0, 0)] = full
        if sample > 0:
            _DATASETS[key] = replace(
                full, valid=sample_split(full.valid, sample, seed), test=sample_split(full.test, sample, seed)
            )
    return _DATASETS[key]


# ------------------------------------------------------------------------------------------------ training
def resolve_config(model: str, overrides: tuple[str, ...] | list[str]) -> dict[str, Any]:
    return load_config(model, overrides=list(overrides))


def expected_run_id(cfg: dict[str, Any], ds: Dataset, init_run_id: str | None) -> str:
    """The run id `trainer.train` gives this config on this dataset (and warm start), computed up front so a
    finished run is recognised without loading anything."""
    ident = ds.data_hash if init_run_id is None else f"{ds.data_hash}|init={init_run_id}"
    return run_id(cfg, ds.name, ident)


def run_state(run_dir: Path) -> str:
    """'finished', 'partial', 'new' or 'stale' (made by other code): `trainer.run_state`."""
    from sparcode_cli.training.trainer import run_state as state

    return state(run_dir)


def train_job(payload: dict[str, Any]) -> dict[str, Any]:
    """Train (or resume) one run; returns {"run_id", "status", ...} or {"error": message}. Picklable, so a
    worker process can run it; the console output is dropped (the run's own train.log has it all)."""
    import torch
    from rich.console import Console

    from sparcode_cli.errors import UserError
    from sparcode_cli.training.trainer import set_aside, train

    t0 = time.perf_counter()
    try:
        torch.set_num_threads(int(payload["threads"]))
        ds = load(payload["folder"], int(payload.get("sample", 0)), int(payload.get("sample_seed", 0)))
        # the config resolved when the plan was made (its run id is the one expected), not the TOML files as
        # they are now: a model default edited during a long matrix must not change runs under way
        cfg = (
            payload["cfg"]
            if payload.get("cfg") is not None
            else resolve_config(payload["model"], payload["overrides"])
        )
        cfg = {**cfg, "train": {**cfg["train"], "threads": int(payload["threads"])}}
        out = Path(payload["out"])
        state = run_state(out / payload["run_id"])
        if state == "stale":
            set_aside(out / payload["run_id"])
        res = train(
            ds,
            cfg,
            out,
            resume=state == "partial",
            init_from=payload.get("init_from"),
            console=Console(file=io.StringIO()),
            progress=False,
            quiet=True,
        )
        if res.run_id != payload["run_id"]:
            return {"error": f"run id {res.run_id} differs from the expected {payload['run_id']}"}
        if res.status == "interrupted":
            return {"error": "interrupted (resumable: run it again)", "interrupted": True}
        return {"run_id": res.run_id, "status": res.status, "wall_s": time.perf_counter() - t0}
    except UserError as exc:
        return {"error": exc.message + (f" ({exc.hint})" if getattr(exc, "hint", None) else "")}
    except KeyboardInterrupt:
        return {"error": "interrupted (resumable: run it again)", "interrupted": True}
    except Exception as exc:  # a bug in one run must not take the matrix down
        return {"error": f"{type(exc).__name__}: {exc}"}


def run_summary(run_dir: Path) -> dict[str, Any]:
    """results.json, meta.json and the last epoch's model statistics (codes in use, bias, density)."""
    out: dict[str, Any] = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    meta = run_dir / "meta.json"
    if meta.is_file():
        m = json.loads(meta.read_text(encoding="utf-8"))
        out["meta"] = {
            k: m.get(k)
            for k in (
                "threads",
                "n_params",
                "init_from",
                "git_commit",
                "code_digest",
                "content_digest",
                "seed",
                "device",
            )
        }
    hist = run_dir / "metrics.jsonl"
    if hist.is_file():
        rows = [json.loads(line) for line in hist.read_text(encoding="utf-8").splitlines() if line.strip()]
        # the last full epoch's statistics: a run stopped by max_steps ends with a partial (maybe 1-step) one
        full = [r["model"] for r in rows if r.get("model") and not r.get("partial_epoch")]
        stats = full or [r["model"] for r in rows if r.get("model")]
        if stats:
            out["last_epoch_stats"] = stats[-1]
    return out


# ------------------------------------------------------------------------------------------------ evaluation
def cell_path(run_dir: Path, spec: EvalSpec, split: str) -> Path:
    return run_dir / CELLS / f"{split}-{spec.users}-{spec.key}.json"


def _bias_for_density(run_dir: Path, ds: Dataset, factor: float) -> tuple[float, float]:
    """(bias, trained density estimate): the `--bias` that makes the index `factor` x as dense as the trained
    bias does, from the quantiles of g over a seeded sample of the codes users reach."""
    import torch

    from sparcode_cli.indexing import reached_codes
    from sparcode_cli.models import attach_features, load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(run_dir))
    attach_features(model, ds.features)
    b0 = float(model.bias)
    codes = reached_codes(model, ds)
    if len(codes) > BIAS_PROBE_CODES:
        codes = np.sort(np.random.default_rng(0).choice(codes, size=BIAS_PROBE_CODES, replace=False))
    with torch.inference_mode():
        model.bias.fill_(BIG_BIAS)
        g = model.score_codes(torch.from_numpy(codes))[:, 1:].double().numpy().ravel() - BIG_BIAS
    d0 = float((g + b0 > 0).mean())
    target = min(1.0, max(d0 * factor, 1.0 / len(g)))
    return float(-np.quantile(g, 1.0 - target)), d0


def evaluate_cell(spec: EvalSpec, run_dir: Path, ds: Dataset, settings: dict[str, Any]) -> dict[str, Any]:
    """Build the cell's index (if any) and evaluate it; returns (and caches) the cell dict."""
    from sparcode_cli.evaluation import evaluate_index, evaluate_run
    from sparcode_cli.indexing import build_index

    split = str(settings["split"])
    threads = int(settings["eval_threads"])
    lat = int(settings["latency_queries"])
    opts = dict(spec.options)
    t0 = time.perf_counter()
    manifest: dict[str, Any] | None = None
    extra: dict[str, Any] = {}
    if spec.retriever == "exact":
        # brute force (all-to-all on Gowalla: minutes a pass) is timed over one pass: no target is set on it
        metrics = evaluate_run(
            run_dir, ds=ds, split=split, threads=threads, latency_queries=lat, repeats=1, progress=False
        )
    else:
        out = run_dir / INDEXES / spec.key
        kw: dict[str, Any] = {}
        if spec.retriever == "sparse":
            factor = float(opts.get("density_factor", 1.0))
            if factor != 1.0:
                kw["bias"], extra["trained_density_estimate"] = _bias_for_density(run_dir, ds, factor)
            extra["density_factor"] = factor
        else:
            kw["faiss_kind"] = spec.retriever
            if "ef_search" in opts:
                kw["ef_search"] = int(opts["ef_search"])
        if (out / "manifest.json").is_file():
            manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        if manifest is None or manifest.get("code_digest") != code_digest():
            manifest = build_index(run_dir, out, ds=ds, threads=threads, progress=False, **kw)
        metrics = evaluate_index(
            out, ds=ds, split=split, threads=threads, latency_queries=lat, progress=False
        )
    cell = {
        "key": spec.key,
        "table": spec.table,
        "users": spec.users,
        "retriever": spec.retriever,
        "options": opts,
        "dataset": spec.train.dataset,
        "model": spec.train.model,
        "label": spec.train.label,
        "encoder": spec.train.encoder,
        "interaction": spec.train.interaction,
        "seed": spec.train.seed,
        "variant": dict(spec.train.variant),
        "run_id": run_dir.name,
        "run_dir": str(run_dir),
        "metrics": {k: v for k, v in metrics.items() if k != "versions"},
        "manifest": {
            k: v for k, v in (manifest or {}).items() if k not in ("files", "versions", "data_params")
        },
        "train": run_summary(run_dir),
        "code_digest": code_digest(),
        "eval_wall_s": time.perf_counter() - t0,
        **extra,
    }
    write_json(cell_path(run_dir, spec, split), cell)
    return cell


def as_listed(cell: dict[str, Any], spec: EvalSpec) -> dict[str, Any]:
    """A cached cell as `spec` lists it (one run can be a main cell and a sweep point at once), with its run's
    summary read afresh."""
    run_dir = Path(cell.get("run_dir", ""))
    train = cell.get("train", {})
    if (run_dir / "results.json").is_file():
        with contextlib.suppress(OSError, ValueError):
            train = run_summary(run_dir)
    return {
        **cell,
        "train": train,
        "table": spec.table,
        "label": spec.train.label,
        "variant": dict(spec.train.variant),
        "dataset": spec.train.dataset,
    }


def read_cell(path: Path) -> dict[str, Any] | None:
    """A cached cell, or None if there is none or other code evaluated it."""
    try:
        cell = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cell if isinstance(cell, dict) and cell.get("code_digest") == code_digest() else None
