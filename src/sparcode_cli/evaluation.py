"""`sparcode eval`: retrieval quality and cost of an index artifact, or of any run by brute force (DESIGN §4).

    res = evaluate_index("out/", ds=None, split="test", ks=(20, 50), threads=2)   # -> the metrics.json dict
    res = evaluate_run("runs/popularity-movielens-...", split="test")               # exact scoring, any model

`evaluate_index` loads the artifact on its own (manifest.json, query_encoder.pt, index.npz / index.faiss;
never the run folder), loads the dataset (given, or `dataset=` prepared with the recorded data parameters, or
the recorded processed folder) and refuses one whose data hash differs. It encodes the split's users (timed
apart), retrieves K = max(ks) items per user with their query history masked, and reports:

- quality: recall / ndcg / precision / hitrate / list_len @K (metrics.metrics_from_topk);
- overlap@K against the exact reference on up to `exact_users` users: SparCode against the same quantized
  model scored by brute force (score_all; 1.0 when nothing is capped), two-tower against an exact Faiss flat
  search over the same item vectors;
- cost: batch QPS over all users (retrieval only, the median of `repeats` passes after a first untimed one;
  encoding reported apart), single-query latency p50 / p99 of `latency_queries` one-user retrievals (the median
  over `repeats` rounds; encoding excluded, its own p50 reported apart), each at 1 thread and
  at `threads` (torch + Faiss OpenMP; the sparse index's numba kernel takes torch's count); index bytes,
  nnz, density, mean list length, users served on the fly (codes without an index row).

`evaluate_run` ranks every item with the model's `score_all` (popularity, all-to-all, or any model), so all
models land in one table; its timings include query encoding.

Output: metrics.json (every field) and a row appended to results.md, in the index folder (for a run: the run
folder); `save_topk` writes Parquet (user, rank, item, score) with the dataset's raw ids, rank 1 = best.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from sparcode_cli import distributed as dd
from sparcode_cli.atomic import atomic_path, write_json
from sparcode_cli.data.dataset import Dataset, EvalSplit, Ragged
from sparcode_cli.data.queries import last_items, query_batch
from sparcode_cli.devices import module_device, resolve_device
from sparcode_cli.errors import UserError
from sparcode_cli.indexing import (
    ENCODE_BATCH,
    MANIFEST,
    MANIFEST_FORMAT,
    QUERY_ENCODER,
    encode_users,
    resolve_dataset,
    set_probes,
    versions,
)
from sparcode_cli.metrics import DEFAULT_KS, metrics_from_topk
from sparcode_cli.metrics import topk as dense_topk
from sparcode_cli.retrieval.sparse_index import TopK, overlap_at_k
from sparcode_cli.timing import REPEATS, latency_ms, median_time

METRICS_FILE = "metrics.json"
RESULTS_MD = "results.md"
REBUILD = "Rebuild it with `sparcode index RUN_DIR --out DIR`."
LATENCY_QUERIES = 300
EXACT_USERS = 2000


def all_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------------------ artifact
@dataclass
class Artifact:
    folder: Path
    manifest: dict[str, Any]
    model: Any  # the Recommender rebuilt from query_encoder.pt (eval mode)
    index: Any  # CodeIndex (sparse) or faiss.Index

    @property
    def sparse(self) -> bool:
        return self.manifest["kind"] == "sparse"

    @property
    def retriever(self) -> str:
        return "sparcode-index" if self.sparse else f"faiss-{self.manifest['kind']}"


def load_manifest(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"index folder {folder} does not exist", REBUILD)
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder} is not a complete index artifact (no {MANIFEST})", REBUILD)
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not valid JSON ({type(exc).__name__})", REBUILD) from None
    need = {"format", "model", "kind", "data_hash", "dataset", "n_items", "files"}
    if not isinstance(m, dict) or not need <= m.keys():
        raise UserError(f"{path} is not an index manifest (it lacks {', '.join(sorted(need))})", REBUILD)
    if m["format"] != MANIFEST_FORMAT:
        raise UserError(
            f"{path} has manifest format {m['format']}; this version reads {MANIFEST_FORMAT}", REBUILD
        )
    for name, info in dict(m["files"]).items():
        f = folder / name
        if not f.is_file():
            raise UserError(f"index file {f} is missing", REBUILD)
        size = f.stat().st_size
        if size != int(info.get("bytes", size)):
            raise UserError(
                f"index file {f} is truncated or changed: {size:,} bytes, "
                f"the manifest says {info['bytes']:,}",
                REBUILD,
            )
    return m


def load_artifact(folder: str | Path, manifest: dict[str, Any] | None = None) -> Artifact:
    """Load an index folder (manifest, query encoder, index). Every damaged file is a UserError."""
    from sparcode_cli.models import load_checkpoint, model_from_checkpoint

    folder = Path(folder)
    m = manifest or load_manifest(folder)
    ckpt = load_checkpoint(folder / QUERY_ENCODER)
    if ckpt["model"] != m["model"]:
        raise UserError(
            f"{folder / QUERY_ENCODER} holds a {ckpt['model']} model, the manifest {m['model']}", REBUILD
        )
    try:
        model = model_from_checkpoint(ckpt)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise UserError(
            f"{folder / QUERY_ENCODER} does not load into a {m['model']} model ({exc})", REBUILD
        ) from None
    if m["kind"] == "sparse":
        from sparcode_cli.retrieval.sparse_index import CodeIndex

        index = CodeIndex.load(folder)
        if index.n_items != int(m["n_items"]) or index.nnz != int(m["nnz"]):
            raise UserError(f"{folder} index does not match its manifest (items / nnz)", REBUILD)
    else:
        from sparcode_cli.retrieval.faiss_index import FAISS_FILE, load_faiss_index

        index = load_faiss_index(folder / FAISS_FILE)
        if int(index.ntotal) != int(m["n_items"]):
            raise UserError(
                f"{folder / FAISS_FILE} holds {index.ntotal} items, the manifest {m['n_items']}", REBUILD
            )
    return Artifact(folder, m, model, index)


# ------------------------------------------------------------------------------------------------ retrieval
def take_rows(r: Ragged, rows: np.ndarray) -> Ragged:
    """The rows `rows` of a Ragged, as a new Ragged (vectorised)."""
    rows = np.asarray(rows, dtype=np.int64)
    starts, lens = r.indptr[rows], r.indptr[rows + 1] - r.indptr[rows]
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lens, out=indptr[1:])
    pos = np.repeat(starts - indptr[:-1], lens) + np.arange(int(indptr[-1]), dtype=np.int64)
    return Ragged(indptr, r.values[pos])


def take_topk(t: TopK, rows: np.ndarray) -> TopK:
    return TopK(t.items[rows], t.scores[rows], t.lengths[rows])


def index_retrieve(art: Artifact, enc: np.ndarray, history: Ragged, k: int) -> TopK:
    """Top-k from the artifact's index for encoded queries (codes or vectors), history masked."""
    if art.sparse:
        from sparcode_cli.retrieval.sparse_index import retrieve

        model = art.model

        def on_the_fly(code_ids: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model.score_codes(torch.from_numpy(np.asarray(code_ids, dtype=np.int64))).numpy()

        return retrieve(art.index, enc, history, k, on_the_fly=on_the_fly)
    from sparcode_cli.retrieval.faiss_index import search

    return search(art.index, enc, history, k)


def exact_topk(
    model: Any,
    ds: Dataset,
    history: Ragged,
    users: np.ndarray,
    k: int,
    *,
    exclude_nonpositive: bool | None = None,
    batch: int = 512,
) -> TopK:
    """Brute-force top-k with the model's `score_all` (history row j = users[j]'s query, all of it masked);
    the same ranking as metrics.evaluate."""
    if exclude_nonpositive is None:
        exclude_nonpositive = bool(getattr(model, "exclude_nonpositive", False))
    max_history = int(model.cfg.get("max_history", 50))
    dev = module_device(model)
    n = history.n_rows
    out = TopK.empty(n, k)
    with torch.inference_mode():
        for s in range(0, n, batch):
            rows = np.arange(s, min(s + batch, n), dtype=np.int64)
            q = query_batch(
                last_items(history, rows, max_history), ds.features.user_feats[users[rows]], users[rows]
            )
            scores = model.score_all(q.to(dev))
            if not scores.is_contiguous():
                scores = scores.contiguous()
            lens = history.lengths()[rows]
            r = torch.from_numpy(np.repeat(np.arange(len(rows), dtype=np.int64), lens))
            c = torch.from_numpy(history.values[history.indptr[s] : history.indptr[rows[-1] + 1]])
            scores[r.to(dev), c.to(dev)] = float("-inf")
            scores[:, 0] = float("-inf")
            items, lengths = dense_topk(scores, k, exclude_nonpositive=exclude_nonpositive)
            items, lengths = items.to(dev), lengths.to(dev)  # topk returns CPU tensors
            vals = torch.gather(scores, 1, items).float()
            pad = torch.arange(k, device=dev)[None, :] >= lengths[:, None]
            vals[pad] = float("-inf")
            out.items[rows] = items.cpu().numpy()
            out.scores[rows] = vals.cpu().numpy()
            out.lengths[rows] = lengths.cpu().numpy()
    return out


# ------------------------------------------------------------------------------------------------ torchrun
def gather_topk(n: int, block: int, topk_of: Callable[[np.ndarray], TopK]) -> TopK:
    """Under torchrun: each rank computes `topk_of(rows)` for its contiguous range of whole blocks of `block`
    users (so every block is the one one process would score), and every rank gets all n users' lists."""
    lo, hi = dd.shard(-(-n // block))
    rows = np.arange(lo * block, min(hi * block, n), dtype=np.int64)
    mine = dd.agreed(lambda: topk_of(rows))
    parts = dd.all_gather_object(mine)
    return TopK(
        np.concatenate([p.items for p in parts]),
        np.concatenate([p.scores for p in parts]),
        np.concatenate([p.lengths for p in parts]),
        sum(p.n_on_the_fly_users for p in parts),
    )


def _sharded_index_eval(
    art: Artifact,
    ds: Dataset,
    es: EvalSplit,
    ks: tuple[int, ...],
    folder: Path,
    save_topk: str | Path | None,
    write: bool,
    t_start: float,
) -> dict[str, Any] | None:
    """`sparcode eval --index` under torchrun: the users' retrieval sharded over the ranks, the metrics of all
    of them; no timing (a rate measured while other ranks share the machine would mislead: measure with one
    process)."""
    kmax = max(ks)

    def retrieve_rows(rows: np.ndarray) -> TopK:
        enc = encode_users(art.model, ds, es.query, es.users[rows], rows=rows)
        return index_retrieve(art, enc, take_rows(es.query, rows), kmax)

    top = gather_topk(len(es.users), ENCODE_BATCH, retrieve_rows)
    res = metrics_from_topk(top.items, es.targets, ks, users=es.users, lengths=top.lengths)
    m = art.manifest
    out = {
        "retriever": art.retriever,
        "model": m["model"],
        "kind": m["kind"],
        "run_id": m.get("run_id"),
        "index_dir": str(folder.resolve()),
    }
    out.update(
        {k: m.get(k) for k in ("index_bytes", "nnz", "density", "n_codes_built", "build_s", "pairs_per_s")}
    )
    out["users_on_the_fly"] = int(top.n_on_the_fly_users)
    return _sharded_finish(out, res, top, ds, es, ks, folder, save_topk, write, t_start)


def _sharded_finish(
    out: dict[str, Any],
    res: Any,
    top: TopK,
    ds: Dataset,
    es: EvalSplit,
    ks: tuple[int, ...],
    folder: Path,
    save_topk: str | Path | None,
    write: bool,
    t_start: float,
) -> dict[str, Any] | None:
    """Rank 0 writes what a sharded evaluation found; the other ranks return None."""
    if not dd.is_main():
        return None
    out = {
        **out,
        "dataset": ds.name,
        "data_hash": ds.data_hash,
        "split": es.name,
        "ks": list(ks),
        **res.summary,
        **{f"overlap@{k}": None for k in ks},
        "threads": torch.get_num_threads(),
        "n_eval_users": len(es.users),
        "world_size": dd.world_size(),
        "mean_list_len": float(top.lengths.mean()) if len(es.users) else 0.0,
        "short_lists": int((top.lengths < max(ks)).sum()),
        "timing_note": "sharded over torchrun ranks: accuracy only, no timing (measure speed with one process)",
    }
    return _finish(out, ds, es, top, folder, save_topk, write, t_start)


# ------------------------------------------------------------------------------------------------ timing
def _one(r: Ragged, j: int) -> Ragged:
    return Ragged(np.array([0, r.indptr[j + 1] - r.indptr[j]], dtype=np.int64), r.row(j).copy())


def _sample(n: int, m: int, seed: int = 0) -> np.ndarray:
    if m >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False)).astype(np.int64)


def _thread_counts(threads: int) -> list[int]:
    return sorted({1, threads})


# ------------------------------------------------------------------------------------------------ evaluate
def _resolve(
    ds: Dataset | None,
    data_hash: str,
    name: str,
    data_cfg: dict[str, Any],
    processed_dir: str | None,
    dataset: str | None,
    mirror: str | None,
    progress: bool,
) -> Dataset:
    if ds is None:
        with dd.main_first():
            ds, _ = resolve_dataset(
                data_hash=data_hash,
                dataset_name=name,
                data_cfg=data_cfg,
                dataset=dataset,
                processed_dir=processed_dir,
                mirror=mirror,
                progress=progress and dd.is_main(),
            )
    elif ds.data_hash != data_hash:
        raise UserError(
            f"data hash mismatch: built from {name!r} with data hash {data_hash}, the dataset given has "
            f"{ds.data_hash}",
            "Evaluate on the dataset it was built from, or rebuild it.",
        )
    return ds


def _check_ks(ks: tuple[int, ...]) -> tuple[int, ...]:
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] < 1:
        raise UserError(f"--k must be positive integers, got {ks}")
    return ks


def evaluate_index(
    index_dir: str | Path,
    ds: Dataset | None = None,
    split: str = "test",
    ks: tuple[int, ...] = DEFAULT_KS,
    threads: int | None = None,
    *,
    dataset: str | None = None,
    mirror: str | None = None,
    save_topk: str | Path | None = None,
    latency_queries: int = LATENCY_QUERIES,
    exact_users: int = EXACT_USERS,
    repeats: int = REPEATS,
    probes: int | None = None,
    write: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate an index artifact on `split` (see the module docstring); returns the metrics.json dict.
    `probes`: serve a SparCode index with this many code ids per user token instead of the artifact's."""
    from sparcode_cli.retrieval.faiss_index import threads as faiss_threads

    t_start = time.perf_counter()
    folder = Path(index_dir)
    ks = _check_ks(ks)
    if split not in ("valid", "test"):
        raise UserError(f"--split must be valid or test, got {split!r}")
    m = load_manifest(folder)
    ds = _resolve(
        ds, str(m["data_hash"]), str(m["dataset"]), dict(m.get("data_params") or {}),
        m.get("processed_dir"), dataset, mirror, progress,
    )  # fmt: skip
    art = load_artifact(folder, m)
    if probes is not None:
        if not art.sparse:
            raise UserError("--probes applies to a sparcode index; this is a Faiss index", "Drop --probes.")
        set_probes(art.model, probes)
    if ds.n_items != int(m["n_items"]):
        raise UserError(f"the index has {m['n_items']} items, the dataset {ds.n_items}", REBUILD)
    es = ds.split(split)
    n = len(es.users)
    kmax = max(ks)
    n_threads = int(threads) if threads else all_threads()

    with faiss_threads(n_threads):
        if dd.is_distributed():
            return _sharded_index_eval(art, ds, es, ks, folder, save_topk, write, t_start)
        t0 = time.perf_counter()
        enc = encode_users(art.model, ds, es.query, es.users)
        encode_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        top = index_retrieve(art, enc, es.query, kmax)
        first_s = time.perf_counter() - t0
    res = metrics_from_topk(top.items, es.targets, ks, users=es.users, lengths=top.lengths)

    # --- overlap with the exact reference on a sample of users
    ref_rows = _sample(n, exact_users)
    with faiss_threads(n_threads):
        if art.sparse:
            ref = exact_topk(art.model, ds, take_rows(es.query, ref_rows), es.users[ref_rows], kmax)
            ref_name = "exact model scoring (score_all, same quantized model)"
        else:
            from sparcode_cli.retrieval.faiss_index import build_faiss_index, search

            with torch.inference_mode():
                vecs = art.model.item_embeddings().float().numpy()
            flat = build_faiss_index(vecs, "flat")
            ref = search(flat, enc[ref_rows], take_rows(es.query, ref_rows), kmax)
            ref_name = "exact Faiss flat over the same item vectors"
    mine = take_topk(top, ref_rows)
    overlap = {f"overlap@{k}": float(overlap_at_k(mine, ref, k)) for k in ks}

    # --- timings: batch QPS and single-query latency, at 1 thread and at n_threads
    lat_rows = _sample(n, latency_queries, seed=1)
    singles = [(enc[j : j + 1], _one(es.query, int(j))) for j in lat_rows]
    timing: dict[int, dict[str, Any]] = {}
    for t in _thread_counts(n_threads):
        with faiss_threads(t):
            batch_s = median_time(lambda: index_retrieve(art, enc, es.query, kmax), repeats)
            calls = [lambda e=e, h=h: index_retrieve(art, e, h, kmax) for e, h in singles]
            p50, p99 = latency_ms(calls, repeats)
        timing[t] = {"batch_s": batch_s, "qps": n / batch_s if batch_s > 0 else None, "p50": p50, "p99": p99}
    with faiss_threads(n_threads):
        enc_calls = [
            lambda j=j: encode_users(art.model, ds, es.query, es.users[j : j + 1], rows=np.array([j]))
            for j in lat_rows[: min(len(lat_rows), 100)]
        ]
        enc_p50, _ = latency_ms(enc_calls, 1)

    out: dict[str, Any] = {
        "retriever": art.retriever,
        "model": m["model"],
        "kind": m["kind"],
        "run_id": m.get("run_id"),
        "index_dir": str(folder.resolve()),
        "dataset": ds.name,
        "data_hash": ds.data_hash,
        "split": split,
        "ks": list(ks),
        **res.summary,
        **overlap,
        "overlap_reference": ref_name,
        "overlap_users": len(ref_rows),
        **_timing_fields(timing, n_threads, n, encode_s, enc_p50, first_s, len(lat_rows), False, repeats),
        "index_bytes": m.get("index_bytes"),
        "nnz": m.get("nnz"),
        "density": m.get("density"),
        "n_codes_built": m.get("n_codes_built"),
        "mean_list_len": float(top.lengths.mean()) if n else 0.0,
        "short_lists": int((top.lengths < kmax).sum()),
        "users_on_the_fly": int(top.n_on_the_fly_users),
        "build_s": m.get("build_s"),
        "pairs_per_s": m.get("pairs_per_s"),
        "bias": m.get("bias"),
        "max_per_code": m.get("max_per_code"),
        "probes": int(art.model.probes) if art.sparse else None,
        "faiss_params": m.get("faiss_params"),
    }
    return _finish(out, ds, es, top, folder, save_topk, write, t_start)


def evaluate_run(
    run_dir: str | Path,
    ds: Dataset | None = None,
    split: str = "test",
    ks: tuple[int, ...] = DEFAULT_KS,
    threads: int | None = None,
    *,
    dataset: str | None = None,
    mirror: str | None = None,
    save_topk: str | Path | None = None,
    latency_queries: int = LATENCY_QUERIES,
    batch_size: int = 512,
    repeats: int = REPEATS,
    device: str = "cpu",
    write: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Brute-force exact evaluation of any run (every item scored by `score_all`, on `device`; "auto": CUDA
    when present, and the timings are then the GPU's); the metrics.json dict."""
    from sparcode_cli.indexing import _load_run
    from sparcode_cli.models import attach_features, model_from_checkpoint
    from sparcode_cli.retrieval.faiss_index import threads as faiss_threads

    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    ks = _check_ks(ks)
    if split not in ("valid", "test"):
        raise UserError(f"--split must be valid or test, got {split!r}")
    dev = resolve_device(device)
    ckpt, ckpt_path, meta = _load_run(run_dir)
    data_hash = str(ckpt.get("data_hash") or meta.get("data_hash") or "")
    name = str(ckpt.get("dataset") or meta.get("dataset") or "")
    ds = _resolve(
        ds, data_hash, name, dict(ckpt.get("config", {}).get("data", {})), None, dataset, mirror, progress
    )
    model = model_from_checkpoint(ckpt)
    attach_features(model, ds.features)
    model.to(dev)
    es = ds.split(split)
    n = len(es.users)
    kmax = max(ks)
    n_threads = int(threads) if threads else all_threads()
    with faiss_threads(n_threads):
        t0 = time.perf_counter()
        if dd.is_distributed():
            top = gather_topk(
                n,
                batch_size,
                lambda r: exact_topk(model, ds, take_rows(es.query, r), es.users[r], kmax, batch=batch_size),
            )
        else:
            top = exact_topk(model, ds, es.query, es.users, kmax, batch=batch_size)
        first_s = time.perf_counter() - t0
    if dd.is_distributed():
        res = metrics_from_topk(top.items, es.targets, ks, users=es.users, lengths=top.lengths)
        out = {
            "retriever": "exact",
            "model": str(ckpt["model"]),
            "kind": "exact",
            "run_id": str(ckpt.get("run_id") or meta.get("run_id") or run_dir.name),
            "run_dir": str(run_dir.resolve()),
            "device": str(dev),
        }
        folder = run_dir if run_dir.is_dir() else run_dir.parent
        return _sharded_finish(out, res, top, ds, es, ks, folder, save_topk, write, t_start)
    res = metrics_from_topk(top.items, es.targets, ks, users=es.users, lengths=top.lengths)
    lat_rows = _sample(n, latency_queries, seed=1)
    timing: dict[int, dict[str, Any]] = {}
    for t in _thread_counts(n_threads):
        with faiss_threads(t):
            batch_s = median_time(
                lambda: exact_topk(model, ds, es.query, es.users, kmax, batch=batch_size), repeats
            )
            singles = [(_one(es.query, int(j)), es.users[j : j + 1]) for j in lat_rows]
            calls = [lambda h=h, u=u: exact_topk(model, ds, h, u, kmax) for h, u in singles]
            p50, p99 = latency_ms(calls, repeats)
        timing[t] = {"batch_s": batch_s, "qps": n / batch_s if batch_s > 0 else None, "p50": p50, "p99": p99}
    out: dict[str, Any] = {
        "retriever": "exact",
        "model": str(ckpt["model"]),
        "kind": "exact",
        "run_id": str(ckpt.get("run_id") or meta.get("run_id") or run_dir.name),
        "index_dir": None,
        "run_dir": str(run_dir.resolve()),
        "dataset": ds.name,
        "data_hash": ds.data_hash,
        "split": split,
        "ks": list(ks),
        **res.summary,
        **{f"overlap@{k}": 1.0 for k in ks},
        "overlap_reference": "itself (exact scoring)",
        "overlap_users": n,
        **_timing_fields(timing, n_threads, n, None, None, first_s, len(lat_rows), True, repeats),
        "device": str(dev),
        "index_bytes": None,
        "nnz": None,
        "density": None,
        "n_codes_built": None,
        "mean_list_len": float(top.lengths.mean()) if n else 0.0,
        "short_lists": int((top.lengths < kmax).sum()),
        "users_on_the_fly": 0,
        "build_s": None,
        "pairs_per_s": None,
        "bias": None,
        "max_per_code": None,
        "faiss_params": None,
    }
    folder = run_dir if run_dir.is_dir() else run_dir.parent
    return _finish(out, ds, es, top, folder, save_topk, write, t_start)


def _timing_fields(
    timing: dict[int, dict[str, Any]],
    n_threads: int,
    n: int,
    encode_s: float | None,
    enc_p50: float | None,
    first_s: float,
    n_lat: int,
    includes_encoding: bool,
    repeats: int,
) -> dict[str, Any]:
    hi, lo = timing[n_threads], timing[1]
    return {
        "n_eval_users": n,
        "threads": n_threads,
        "qps_batch": hi["qps"],
        "latency_p50_ms": hi["p50"],
        "latency_p99_ms": hi["p99"],
        "qps_batch_1t": lo["qps"],
        "latency_p50_ms_1t": lo["p50"],
        "latency_p99_ms_1t": lo["p99"],
        "retrieve_s": hi["batch_s"],
        "retrieve_s_1t": lo["batch_s"],
        "retrieve_first_s": first_s,
        "encode_s": encode_s,
        "encode_qps": (n / encode_s) if encode_s else None,
        "encode_latency_p50_ms": enc_p50,
        "latency_queries": n_lat,
        "timing_repeats": repeats,
        "timing_includes_encoding": includes_encoding,
        "timing_note": (
            "batch QPS and latency include query encoding (brute-force score_all)"
            if includes_encoding
            else "batch QPS and latency are retrieval only; query encoding is reported apart (encode_*); "
            "the sparse index's kernel runs at torch's thread count"
        ),
    }


def _finish(
    out: dict[str, Any],
    ds: Dataset,
    es: EvalSplit,
    top: TopK,
    folder: Path,
    save_topk: str | Path | None,
    write: bool,
    t_start: float,
) -> dict[str, Any]:
    out["versions"] = versions()
    out["created"] = datetime.now(UTC).isoformat(timespec="seconds")
    if save_topk is not None:
        write_topk(save_topk, ds, es, top)
        out["topk_file"] = str(Path(save_topk).resolve())
    out["eval_s"] = time.perf_counter() - t_start
    if write:
        write_json(folder / METRICS_FILE, out)
        append_markdown(folder / RESULTS_MD, out)
    return out


def write_topk(path: str | Path, ds: Dataset, es: EvalSplit, top: TopK) -> None:
    """Parquet: user (raw id), rank (1 = best), item (raw id), score; one row per retrieved item."""
    keep = np.arange(top.k)[None, :] < top.lengths[:, None]
    r, c = np.nonzero(keep)
    frame = pl.DataFrame(
        {
            "user": [str(x) for x in ds.user_raw_ids[es.users[r]]],
            "rank": (c + 1).astype(np.int32),
            "item": [str(x) for x in ds.item_raw_ids[top.items[r, c]]],
            "score": top.scores[r, c].astype(np.float32),
        },
        schema={"user": pl.String, "rank": pl.Int32, "item": pl.String, "score": pl.Float32},
    )
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp)


def markdown_row(res: dict[str, Any]) -> tuple[str, str]:
    """(header, row) of the results table."""
    ks = res["ks"]
    cols: list[tuple[str, str]] = [
        ("model", res["model"]),
        ("retriever", res["retriever"]),
        ("dataset", res["dataset"]),
        ("split", res["split"]),
    ]
    for k in ks:
        cols += [(f"R@{k}", f"{res[f'recall@{k}']:.4f}"), (f"N@{k}", f"{res[f'ndcg@{k}']:.4f}")]
    kmax = max(ks)
    mb = res.get("index_bytes")
    cols += [
        (
            f"overlap@{kmax}",
            f"{res[f'overlap@{kmax}']:.4f}" if res.get(f"overlap@{kmax}") is not None else "-",
        ),
        ("QPS", f"{res['qps_batch']:,.0f}" if res.get("qps_batch") else "-"),
        ("p50 ms", f"{res['latency_p50_ms']:.3f}" if res.get("latency_p50_ms") is not None else "-"),
        ("p99 ms", f"{res['latency_p99_ms']:.3f}" if res.get("latency_p99_ms") is not None else "-"),
        ("index MB", f"{mb / 2**20:.2f}" if mb else "-"),
        ("density", f"{res['density']:.4f}" if res.get("density") is not None else "-"),
        ("on the fly", str(res.get("users_on_the_fly", 0))),
        ("threads", str(res["threads"])),
        ("run", str(res.get("run_id") or "-")),
    ]
    header = "| " + " | ".join(c for c, _ in cols) + " |\n|" + "|".join("---" for _ in cols) + "|\n"
    row = "| " + " | ".join(v for _, v in cols) + " |\n"
    return header, row


def append_markdown(path: Path, res: dict[str, Any]) -> None:
    """Append the result row to `path`, writing the header first when the file is new (or its last table has
    other columns). Rewritten atomically."""
    header, row = markdown_row(res)
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if not old:
        text = header + row
    else:
        tables = [i for i in range(len(old)) if old.startswith("| ", i) and (i == 0 or old[i - 1] == "\n")]
        last_header = ""
        for i in tables:  # the last header line is the one followed by a |---| line
            line_end = old.find("\n", i)
            nxt = old[line_end + 1 : line_end + 5]
            if nxt.startswith("|---"):
                last_header = old[i : old.find("\n", line_end + 1) + 1]
        sep = "" if old.endswith("\n") else "\n"
        text = old + sep + row if last_header == header else old + sep + "\n" + header + row
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(x) for x in str(text).replace(" ", "").split(",") if x)
    except ValueError:
        raise UserError(f"--k must be a comma-separated list of integers, e.g. 20,50; got {text!r}") from None
    return _check_ks(ks)
