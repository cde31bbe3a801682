"""`sparcode index`: turn a trained run into a self-contained retrieval artifact (DESIGN §2.6, §5).

    manifest = build_index("runs/sparcode-movielens-1a2b3c4d", "out/")            # SparCode: code -> item CSR
    manifest = build_index("runs/two-tower-movielens-...", "out/", faiss_kind="hnsw")  # two-tower: Faiss

The artifact folder (built in a temporary sibling and renamed into place; manifest.json written last):

    manifest.json      what was built from what: model, run id, checkpoint sha256, data hash, dataset,
                       the processed folder and data parameters, sizes (n_items, codes built, nnz, density,
                       bytes), build time, (code, item) pairs scored per second, bias, max_per_code, versions
    index.npz          SparCode: scipy CSR (codes built, n_items + 1) float32 ReLU(g + b) > 0 ...
    index_codes.npz    ... and the global code id of each row (retrieval.sparse_index.CodeIndex.save)
    index.faiss        two-tower: Faiss inner-product index over the item vectors (item 0 excluded)
    query_encoder.pt   what eval needs to map users to codes / vectors and to score codes missing from the
                       index: the model's config + ctx + state_dict (the --bias override included), a plain
                       checkpoint dict loadable with torch.load(weights_only=True). Eval never needs the run.
    items.parquet      item:int32 (1..n_items), raw_id:str

SparCode codes built: `codes="all"` builds the whole N^M universe; `codes="reached"` the codes that training and
validation users reach (each training user encoded with the test-time convention, i.e. its training items as the
query, plus each validation user's query); `codes="auto"` (the default) builds all of them when the universe has
at most AUTO_ALL_PAIRS (code, item) pairs, else the reached ones. A user of a code not built is scored on the fly
at eval time (correct, but it runs the cross network per query: with 65,536 codes and only the reached ones built,
652 of movielens-100k's 943 test users were, and batch QPS fell to half of Faiss flat's).
The build estimates its peak memory first (retrieval.estimate_bytes with the density measured on a sample of
codes) and refuses a build over `memory_budget_mb`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from sparcode_cli import distributed as dd
from sparcode_cli.atomic import atomic_path, file_digest, temp_dir, write_json
from sparcode_cli.cpu_kernels import kernel_family
from sparcode_cli.data.dataset import Dataset, Ragged
from sparcode_cli.data.queries import history_queries, training_users
from sparcode_cli.devices import module_device, resolve_device
from sparcode_cli.errors import UserError
from sparcode_cli.provenance import code_digest, git_commit, versions

MANIFEST = "manifest.json"
QUERY_ENCODER = "query_encoder.pt"
ITEMS = "items.parquet"
MANIFEST_FORMAT = 1
INDEXABLE = ("sparcode", "two-tower")
NO_INDEX_HINT = "Evaluate it by brute force instead: sparcode eval --run {run}"
DEFAULT_BUDGET_MB = 4096.0
CHUNK_BYTES = 64 << 20  # dense score block per build chunk
SAMPLE_CODES = 64  # codes scored first to measure the density for the size estimate
# codes="auto": the whole universe up to this many (code, item) pairs (a few s to build)
AUTO_ALL_PAIRS = 1 << 28
CODE_CHOICES = ("auto", "reached", "all")
ENCODE_BATCH = 1024

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------- helpers
def set_threads(n: int | None) -> None:
    """Torch and Faiss threads (n >= 1); None leaves them as they are."""
    if n is None:
        return
    if n < 1:
        raise UserError(f"--threads must be >= 1, got {n}")
    from sparcode_cli.retrieval.faiss_index import set_threads as _set

    _set(int(n))


def _read_json(path: Path, what: str, hint: str) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{what} {path} is missing", hint)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{what} {path} is not valid JSON ({type(exc).__name__})", hint) from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path} is not a JSON object", hint)
    return obj


def prepare_params(data_cfg: dict[str, Any]) -> dict[str, Any]:
    """A run config's [data] section as `data.preprocess.prepare` keywords."""
    from sparcode_cli.config import nullable

    return {
        "split": nullable(data_cfg.get("split", "default")),
        "min_count": nullable(data_cfg.get("min_count", "default")),
        "rating_threshold": nullable(data_cfg.get("rating_threshold", "default")),
        "max_history": int(data_cfg.get("max_history", 50)),
        "seed": int(data_cfg.get("seed", 0)),
    }


def resolve_dataset(
    *,
    data_hash: str,
    dataset_name: str,
    data_cfg: dict[str, Any],
    dataset: str | None = None,
    processed_dir: str | Path | None = None,
    mirror: str | None = None,
    progress: bool = True,
) -> tuple[Dataset, Path]:
    """Load the dataset an artifact or run was made from, and check its data hash.

    Order: `dataset` (a name or file, prepared with the recorded data parameters) if given; else the recorded
    processed folder; else `$SPARCODE_HOME/processed/<data_hash>`; else the recorded dataset name, prepared.
    """
    from sparcode_cli.data.preprocess import prepare
    from sparcode_cli.data.store import load_dataset

    params = prepare_params(data_cfg)
    folder: Path | None = None
    if dataset is not None:
        folder = prepare(dataset, mirror=mirror, progress=progress, **params)
    else:
        from sparcode_cli import paths

        for cand in (processed_dir, paths.processed_root() / data_hash):
            if cand and (Path(cand) / "meta.json").is_file():
                folder = Path(cand)
                break
        if folder is None:
            try:
                folder = prepare(dataset_name, mirror=mirror, progress=progress, **params)
            except UserError as exc:
                raise UserError(
                    f"the dataset {dataset_name!r} (data hash {data_hash}) is not in the processed cache "
                    f"and cannot be prepared: {exc.message}",
                    "Pass --dataset NAME|FILE (and --mirror if it must be fetched).",
                ) from None
    ds = load_dataset(folder)
    if ds.data_hash != data_hash:
        raise UserError(
            f"data hash mismatch: it was built from {dataset_name!r} with data hash {data_hash}, but "
            f"{folder} has data hash {ds.data_hash}",
            "Give the dataset it was built from (same file and preprocessing parameters), or rebuild it.",
        )
    return ds, folder


def encode_users(
    model: torch.nn.Module,
    ds: Dataset,
    history: Ragged,
    users: np.ndarray,
    rows: np.ndarray | None = None,
    batch: int = ENCODE_BATCH,
) -> np.ndarray:
    """Encode queries: user users[j] reads history row rows[j] (default j). SparCode -> (U, K_u x probes) int64
    code ids, sorted within each row; two-tower -> (U, d) float32 query vectors (1/τ folded in)."""
    max_history = int(model.cfg.get("max_history", 50))
    is_codes = hasattr(model, "codes")
    dev = module_device(model)
    out = []
    with torch.inference_mode():
        for q in history_queries(ds, history, users, max_history, rows=rows, batch=batch):
            q = q.to(dev)  # a no-op on CPU
            if is_codes:
                out.append(torch.sort(model.codes(q), dim=1).values.cpu().numpy())
            else:
                out.append(model.encode_queries(q).float().cpu().numpy())
    if not out:
        width = int(getattr(model, "k_u", 0)) * int(getattr(model, "probes", 1))
        return np.zeros((0, width), dtype=np.int64 if is_codes else np.float32)
    return np.concatenate(out)


def set_probes(model: Any, probes: int) -> None:
    """Serve `model` (SparCode) with `probes` code ids per user token; a UserError when it has fewer codes."""
    if not 1 <= int(probes) <= int(model.n_codes):
        raise UserError(
            f"--probes must be between 1 and the model's {model.n_codes:,} code ids, got {probes}"
        )
    model.probes = int(probes)  # the code rows stay: only which rows a user reads changes


def resolve_codes(codes: str, n_codes: int, n_items: int) -> str:
    """ "auto" -> "all" when the universe's (code, item) pairs are at most AUTO_ALL_PAIRS, else "reached"."""
    if codes != "auto":
        return codes
    return "all" if n_codes * (n_items + 1) <= AUTO_ALL_PAIRS else "reached"


def reached_codes(model: torch.nn.Module, ds: Dataset) -> np.ndarray:
    """Sorted distinct code ids of every training user (its training items as the query, the test-time
    convention) and every validation user (its validation query)."""
    train_users = training_users(ds)
    a = encode_users(model, ds, ds.train, train_users, rows=train_users)  # train row index = user id
    b = encode_users(model, ds, ds.valid.query, ds.valid.users)
    return np.unique(np.concatenate([a.ravel(), b.ravel()])).astype(np.int64)


@contextmanager
def _progress(enabled: bool, description: str, total: int) -> Iterator[Callable[[int], None]]:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield lambda _n: None
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} codes"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.update(task, advance=n)


# ------------------------------------------------------------------------------------------------ builds
def _chunk_rows(n_items: int, block: int) -> int:
    rows = max(1, CHUNK_BYTES // (4 * (n_items + 1)))
    return max(block, rows // block * block)


def build_code_index(
    model: torch.nn.Module,
    code_ids: np.ndarray,
    *,
    max_per_code: int | None = None,
    memory_budget_mb: float = DEFAULT_BUDGET_MB,
    progress: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """Score every (code, item) pair of `code_ids` in chunks and keep ReLU(g + b) > 0 (best `max_per_code`
    per code). Refuses (UserError) a build whose estimated peak memory exceeds the budget.
    Returns (CodeIndex, stats)."""
    from sparcode_cli.retrieval.sparse_index import CSRBuilder, estimate_bytes

    n_items = int(model.ctx.n_items)
    code_ids = np.asarray(code_ids, dtype=np.int64)
    block = int(getattr(model, "CODE_BLOCK", 32))
    chunk = _chunk_rows(n_items, block)
    dev = module_device(model)
    t_all = time.perf_counter()
    with torch.inference_mode():
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(code_ids, size=min(SAMPLE_CODES, len(code_ids)), replace=False))
        sample_scores = None
        if len(sample):
            sample_scores = model.score_codes(torch.from_numpy(sample).to(dev)).cpu().numpy()
            density = float((sample_scores[:, 1:] > 0).mean())
        else:
            density = 0.0
    sample_s = time.perf_counter() - t_all
    est = estimate_bytes(len(code_ids), n_items, density, max_per_code, min(chunk, max(len(code_ids), 1)))
    budget = int(float(memory_budget_mb) * 2**20)
    if est > budget:
        raise UserError(
            f"the index build needs about {est / 2**20:,.1f} MiB ({len(code_ids):,} codes x {n_items:,} "
            f"items at a measured density of {density:.4f}), over the memory budget of "
            f"{float(memory_budget_mb):,.1f} MiB",
            "Raise --memory-budget-mb, cap rows with --max-per-code M, raise the cut with --bias, or build "
            "fewer codes (--codes reached).",
        )
    builder = CSRBuilder(n_items, max_per_code)
    score_s = sample_s
    rest = code_ids
    if sample_scores is not None:  # the sample's rows are index rows already: kept, not scored twice
        builder.add(sample, sample_scores)
        rest = code_ids[~np.isin(code_ids, sample)]
        del sample_scores
    with torch.inference_mode(), _progress(progress, "scoring codes", len(code_ids)) as advance:
        advance(len(code_ids) - len(rest))
        for s in range(0, len(rest), chunk):
            part = rest[s : s + chunk]
            t0 = time.perf_counter()
            scores = model.score_codes(torch.from_numpy(part).to(dev)).cpu().numpy()
            score_s += time.perf_counter() - t0
            builder.add(part, scores)
            advance(len(part))
    index = builder.finish()
    build_s = time.perf_counter() - t_all
    pairs = len(code_ids) * n_items
    return index, {
        "sample_density": density,
        "estimated_bytes": est,
        "build_s": build_s,
        "score_s": score_s,
        "pairs_scored": pairs,
        "pairs_per_s": pairs / build_s if build_s > 0 else None,
        "score_pairs_per_s": pairs / score_s if score_s > 0 else None,
    }


def _build_sharded(
    model: Any, code_ids: np.ndarray, max_per_code: int | None, memory_budget_mb: float, progress: bool
) -> tuple[Any, dict[str, Any]]:
    """build_code_index, under torchrun over each rank's contiguous range of the code ids, the ranks' rows
    gathered on rank 0 into the one index (row for row what one process builds: a code's row never depends on
    which codes are scored with it). Rank 0 returns (index, stats); the others (None, their stats)."""
    if not dd.is_distributed():
        return build_code_index(
            model, code_ids, max_per_code=max_per_code, memory_budget_mb=memory_budget_mb, progress=progress
        )
    from sparcode_cli.retrieval.sparse_index import concat_code_indexes

    t0 = time.perf_counter()
    lo, hi = dd.shard(len(code_ids))
    part, stats = dd.agreed(
        lambda: build_code_index(
            model,
            code_ids[lo:hi],
            max_per_code=max_per_code,
            memory_budget_mb=memory_budget_mb,
            progress=progress and dd.is_main(),
        )
    )
    parts = dd.gather_object((part, stats))
    if parts is None:
        return None, stats
    index = concat_code_indexes([p for p, _ in parts])
    build_s = time.perf_counter() - t0
    pairs = len(code_ids) * int(model.ctx.n_items)
    score_s = max(s["score_s"] for _, s in parts)
    return index, {
        "sample_density": float(np.mean([s["sample_density"] for _, s in parts])),
        "estimated_bytes": max(s["estimated_bytes"] for _, s in parts),
        "build_s": build_s,
        "score_s": score_s,
        "pairs_scored": pairs,
        "pairs_per_s": pairs / build_s if build_s > 0 else None,
        "score_pairs_per_s": pairs / score_s if score_s > 0 else None,
    }


def _faiss_bytes_estimate(n_items: int, dim: int, kind: str, hnsw_m: int) -> int:
    per = 4 * dim + 8  # vector + id
    if kind == "hnsw":
        per += 2 * hnsw_m * 4 + 8  # level-0 links (2M) plus upper levels, roughly
    return int(2 * n_items * per)  # vectors in torch and numpy, plus the index


# ------------------------------------------------------------------------------------------------ the command
def _load_run(run_dir: Path) -> tuple[dict[str, Any], Path, dict[str, Any]]:
    from sparcode_cli.models import load_checkpoint

    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UserError(f"run folder {run_dir} does not exist", "Give a folder written by `sparcode train`.")
    ckpt_path = run_dir if run_dir.is_file() else run_dir / "checkpoint_best.pt"
    if run_dir.is_dir() and not ckpt_path.is_file():
        ckpt_path = run_dir / "checkpoint_last.pt"
    ckpt = load_checkpoint(ckpt_path)
    meta_path = (run_dir if run_dir.is_dir() else run_dir.parent) / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    return ckpt, ckpt_path, meta


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder", "Choose another --out.")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise UserError(
            f"--out {out} is a non-empty folder that is not an index artifact; refusing to replace it",
            "Choose an empty or new folder for --out.",
        )


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished temporary folder onto `out` (replacing a previous artifact there)."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / "prev")
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old / "prev", out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def build_index(
    run_dir: str | Path,
    out: str | Path,
    *,
    ds: Dataset | None = None,
    dataset: str | None = None,
    mirror: str | None = None,
    bias: float | None = None,
    max_per_code: int | None = None,
    probes: int | None = None,
    codes: str | None = None,
    scores: str | None = None,
    faiss_kind: str | None = None,
    nlist: int | None = None,
    nprobe: int = 16,
    hnsw_m: int = 32,
    ef_construction: int = 200,
    ef_search: int = 128,
    memory_budget_mb: float = DEFAULT_BUDGET_MB,
    threads: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    log: Log | None = None,
) -> dict[str, Any]:
    """Build the retrieval artifact of a SparCode or two-tower run into `out/`; returns the manifest.

    `device`: where the model scores the code table, encodes the reached codes' users and computes the item
    vectors ("auto": CUDA when present; `sparcode index` passes "auto"). The artifact is CPU data either way;
    only a CPU build reproduces CPU exact scoring bit for bit.

    `ds`: the dataset (else resolved from `dataset`, the processed cache or the run's dataset name; its data
    hash must match the run's). SparCode options: bias, max_per_code, probes (code ids read per user token at
    serving, stored in the artifact's query encoder config; default the run's), codes ("auto" | "reached" | "all"),
    scores (how the index stores them: "float32" (default) | "float16" | "uint8"), memory_budget_mb. Two-tower options: faiss_kind ("flat" | "ivf" | "hnsw"), nlist, nprobe, hnsw_m,
    ef_construction, ef_search.
    """
    from sparcode_cli.models import attach_features, make_checkpoint, model_from_checkpoint, save_checkpoint

    say = log or (lambda _m: None)
    run_dir, out = Path(run_dir), Path(out)
    set_threads(threads)
    dev = resolve_device(device)
    ckpt, ckpt_path, meta = _load_run(run_dir)
    name = str(ckpt["model"])
    if name not in INDEXABLE:
        raise UserError(
            f"a {name} model has no index: only sparcode (code -> item index) and two-tower (Faiss) runs "
            "are indexed",
            NO_INDEX_HINT.format(run=run_dir),
        )
    sparse = name == "sparcode"
    if sparse and faiss_kind is not None:
        raise UserError("--faiss applies to two-tower runs; this is a sparcode run")
    if not sparse and (
        bias is not None
        or max_per_code is not None
        or codes is not None
        or scores is not None
        or probes is not None
    ):
        raise UserError(
            "--bias, --max-per-code, --probes, --codes and --scores apply to sparcode runs; this is a "
            "two-tower run"
        )
    codes = codes or "auto"
    scores = scores or "float32"
    from sparcode_cli.retrieval.sparse_index import ENCODINGS

    if scores not in ENCODINGS:
        raise UserError(f"--scores must be one of {', '.join(ENCODINGS)}, got {scores!r}")
    faiss_kind = faiss_kind or "flat"
    if codes not in CODE_CHOICES:
        raise UserError(f"--codes must be one of {', '.join(CODE_CHOICES)}, got {codes!r}")
    if max_per_code is not None and max_per_code < 1:
        raise UserError(f"--max-per-code must be >= 1, got {max_per_code}")
    if memory_budget_mb <= 0:
        raise UserError(f"--memory-budget-mb must be > 0, got {memory_budget_mb}")
    from sparcode_cli.retrieval.faiss_index import KINDS

    if faiss_kind not in KINDS:
        raise UserError(f"--faiss must be one of {', '.join(KINDS)}, got {faiss_kind!r}")
    _prepare_out(out)

    data_hash = str(ckpt.get("data_hash") or meta.get("data_hash") or "")
    dataset_name = str(ckpt.get("dataset") or meta.get("dataset") or "")
    data_cfg = dict(ckpt.get("config", {}).get("data", {}))
    processed_dir: Path | None = None
    if ds is None:
        with dd.main_first():
            ds, processed_dir = resolve_dataset(
                data_hash=data_hash,
                dataset_name=dataset_name,
                data_cfg=data_cfg,
                dataset=dataset,
                mirror=mirror,
                progress=progress and dd.is_main(),
            )
    elif data_hash and ds.data_hash != data_hash:
        raise UserError(f"data hash mismatch: the run has {data_hash}, the dataset {ds.data_hash}")
    model = model_from_checkpoint(ckpt)
    attach_features(model, ds.features)
    if int(model.ctx.n_items) != ds.n_items:
        raise UserError(f"the run has {model.ctx.n_items} items but the dataset {ds.n_items}")
    model.to(dev)
    enc_config = ckpt["config"]
    if probes is not None:
        set_probes(model, probes)
        enc_config = {**enc_config, "model": {**enc_config["model"], "probes": int(probes)}}

    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "model": name,
        "kind": "sparse" if sparse else faiss_kind,
        "run_id": str(ckpt.get("run_id") or meta.get("run_id") or run_dir.name),
        "run_dir": str(run_dir.resolve()),
        "checkpoint": ckpt_path.name,
        "checkpoint_sha256": file_digest(ckpt_path, "sha256"),
        "data_hash": data_hash or ds.data_hash,
        "dataset": dataset_name or ds.name,
        "processed_dir": str(processed_dir.resolve()) if processed_dir is not None else None,
        "data_params": data_cfg,
        "n_items": ds.n_items,
        "threads": torch.get_num_threads(),
        "device": str(dev),
    }
    if dd.is_distributed():
        manifest["world_size"] = dd.world_size()
    if not dd.is_main():  # under torchrun: this rank's shard of the code rows; rank 0 writes the artifact

        def shard() -> None:
            if sparse:
                _build_sparse(model, ds, None, bias, max_per_code, codes, scores, memory_budget_mb, False)

        dd.agreed(shard)  # returns once rank 0 has published the artifact; fails when any rank failed
        return manifest

    def publish() -> None:
        """Build into a temporary sibling and rename it onto `out` (rank 0)."""
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(out.parent, f".{out.name}.", ".tmp")
        try:
            if sparse:
                manifest.update(
                    _build_sparse(
                        model, ds, tmp, bias, max_per_code, codes, scores, memory_budget_mb, progress
                    )
                )
            else:
                manifest.update(
                    _build_faiss(
                        model,
                        tmp,
                        faiss_kind,
                        nlist,
                        nprobe,
                        hnsw_m,
                        ef_construction,
                        ef_search,
                        memory_budget_mb,
                    )
                )
            enc = make_checkpoint(
                model,  # make_checkpoint copies the weights to CPU
                enc_config,
                with_rng=False,
                run_id=manifest["run_id"],
                data_hash=manifest["data_hash"],
                dataset=manifest["dataset"],
            )
            save_checkpoint(tmp / QUERY_ENCODER, enc)
            items = pl.DataFrame(
                {
                    "item": np.arange(1, ds.n_items + 1, dtype=np.int32),
                    "raw_id": [str(x) for x in ds.item_raw_ids[1:]],
                },
                schema={"item": pl.Int32, "raw_id": pl.String},
            )
            with atomic_path(tmp / ITEMS) as p:
                items.write_parquet(p)
            files = sorted(p.name for p in tmp.iterdir() if p.is_file() and not p.name.startswith("."))
            manifest["files"] = {f: {"bytes": (tmp / f).stat().st_size} for f in files}
            manifest["query_encoder_bytes"] = (tmp / QUERY_ENCODER).stat().st_size
            manifest["versions"] = versions()
            manifest["cpu_kernels"] = kernel_family()
            manifest["code_digest"] = code_digest()
            manifest["git_commit"] = git_commit()
            manifest["created"] = datetime.now(UTC).isoformat(timespec="seconds")
            write_json(tmp / MANIFEST, manifest)  # last: its presence means the folder is complete
            _swap_in(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        say(f"wrote {out}")

    dd.agreed(publish)  # under torchrun the other ranks wait here for rank 0 (and fail when it fails)
    return manifest


def _build_sparse(
    model: Any,
    ds: Dataset,
    tmp: Path | None,
    bias: float | None,
    max_per_code: int | None,
    codes: str,
    scores: str,
    memory_budget_mb: float,
    progress: bool,
) -> dict[str, Any]:
    from sparcode_cli.retrieval.sparse_index import CODES_FILE, INDEX_FILE, encode_scores

    trained_bias = float(model.bias)
    if bias is not None:
        model.bias.fill_(float(bias))
    t0 = time.perf_counter()
    requested = codes
    codes = resolve_codes(codes, int(model.n_codes), ds.n_items)
    code_ids = np.arange(model.n_codes, dtype=np.int64) if codes == "all" else reached_codes(model, ds)
    select_s = time.perf_counter() - t0
    index, stats = _build_sharded(model, code_ids, max_per_code, memory_budget_mb, progress)
    if tmp is None:  # not rank 0: its shard went to rank 0
        return {}
    try:
        index = encode_scores(index, scores)
    except ValueError as e:
        raise UserError(f"--scores {scores}: {e}") from None
    index.save(tmp)
    return {
        "codes": codes,
        "codes_requested": requested,
        "n_codes_universe": int(model.n_codes),
        "n_codes_built": int(index.n_rows),
        "k_u": int(model.k_u),
        "probes": int(model.probes),
        "nnz": int(index.nnz),
        "density": float(index.density),
        "mean_row_nnz": float(index.nnz / index.n_rows) if index.n_rows else 0.0,
        "index_bytes": sum((tmp / f).stat().st_size for f in (INDEX_FILE, CODES_FILE)),
        "index_mem_bytes": int(index.nbytes),
        "memory_budget_mb": float(memory_budget_mb),
        "estimated_bytes": int(stats["estimated_bytes"]),
        "sample_density": stats["sample_density"],
        "code_select_s": select_s,
        "build_s": stats["build_s"],
        "score_s": stats["score_s"],
        "pairs_scored": int(stats["pairs_scored"]),
        "pairs_per_s": stats["pairs_per_s"],
        "score_pairs_per_s": stats["score_pairs_per_s"],
        "bias": float(model.bias),
        "bias_trained": trained_bias,
        "max_per_code": max_per_code,
        "scores": index.encoding,
    }


def _build_faiss(
    model: Any,
    tmp: Path,
    kind: str,
    nlist: int | None,
    nprobe: int,
    hnsw_m: int,
    ef_construction: int,
    ef_search: int,
    memory_budget_mb: float,
) -> dict[str, Any]:
    from sparcode_cli.retrieval.faiss_index import FAISS_FILE, build_faiss_index, save_faiss_index

    t0 = time.perf_counter()
    with torch.inference_mode():
        vecs = model.item_embeddings().float().cpu().numpy()
    n_items, dim = vecs.shape[0] - 1, vecs.shape[1]
    est = _faiss_bytes_estimate(n_items, dim, kind, hnsw_m)
    if est > memory_budget_mb * 2**20:
        raise UserError(
            f"the Faiss build needs about {est / 2**20:,.1f} MiB, over the memory budget of "
            f"{memory_budget_mb:,.1f} MiB",
            "Raise --memory-budget-mb.",
        )
    index = build_faiss_index(
        vecs,
        kind,
        nlist=nlist,
        nprobe=nprobe,
        hnsw_m=hnsw_m,
        ef_construction=ef_construction,
        ef_search=ef_search,
    )
    build_s = time.perf_counter() - t0
    save_faiss_index(index, tmp / FAISS_FILE)
    params: dict[str, Any] = {}
    if kind == "ivf":
        from sparcode_cli.retrieval.faiss_index import _inner

        inner = _inner(index)
        params = {"nlist": int(inner.nlist), "nprobe": int(inner.nprobe)}
    elif kind == "hnsw":
        params = {"hnsw_m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search}
    return {
        "faiss": kind,
        "faiss_params": params,
        "dim": int(dim),
        "n_codes_built": None,
        "nnz": None,
        "density": None,
        "index_bytes": (tmp / FAISS_FILE).stat().st_size,
        "memory_budget_mb": float(memory_budget_mb),
        "estimated_bytes": est,
        "build_s": build_s,
        "pairs_scored": None,
        "pairs_per_s": None,
        "bias": None,
        "max_per_code": None,
    }


def summary_rows(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows for the command's table."""

    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    rows = [
        ("model", str(manifest["model"])),
        ("kind", str(manifest["kind"])),
        ("run", str(manifest["run_id"])),
        ("dataset", f"{manifest['dataset']} ({manifest['data_hash']})"),
        ("items", f"{manifest['n_items']:,}"),
    ]
    if manifest["kind"] == "sparse":
        built = f"{manifest['n_codes_built']:,} of {manifest['n_codes_universe']:,} ({manifest['codes']})"
        rows += [
            ("codes built", built),
            ("bias", f"{manifest['bias']:.4f} (trained {manifest['bias_trained']:.4f})"),
            ("max per code", str(manifest["max_per_code"] or "-")),
            ("probes per token", str(manifest.get("probes", 1))),
            ("scores", str(manifest.get("scores") or "float32")),
        ]
    else:
        rows.append(("faiss params", json.dumps(manifest.get("faiss_params", {})) or "-"))
    rows += [
        ("nnz", num(manifest.get("nnz"), ",")),
        ("density", num(manifest.get("density"), ".4f")),
    ]
    rows += [
        ("index size", f"{manifest['index_bytes'] / 2**20:,.2f} MiB"),
        ("build time", f"{manifest['build_s']:.2f} s"),
        ("pairs/s", num(manifest.get("pairs_per_s"), ",.0f")),
        ("threads", str(manifest["threads"])),
    ]
    return rows
