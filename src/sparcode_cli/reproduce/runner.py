"""Run a plan: resolve run ids, train what is not finished (in parallel), evaluate every cell, write reports.

Three phases, so that no timing is measured while this driver trains something else:
1. train: every run whose folder has no results.json is trained (or resumed from checkpoint_last.pt), `jobs`
   at a time in worker processes (`jobs = 1`: in this process); a warm-started run waits for its two-tower run;
2. evaluate: every cell without a cached `cells/*.json` builds its index and is evaluated, one at a time;
3. report: `<results>/<dataset>.md`, its PNGs and `<dataset>.json` from the cached cells.
A finished run and an evaluated cell are never redone, so an interrupted `make reproduce` continues where it
stopped, and a complete one only rewrites the report.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import platform
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from sparcode_cli.cpu_kernels import kernel_family
from sparcode_cli.errors import UserError
from sparcode_cli.provenance import code_digest, git_commit
from sparcode_cli.reproduce import jobs
from sparcode_cli.reproduce.matrix import Plan, TrainSpec
from sparcode_cli.reproduce.progress import Overview


@dataclass
class TrainJob:
    spec: TrainSpec
    cfg: dict[str, Any]
    run_id: str
    run_dir: Path
    folder: Path
    sample: int
    init: TrainJob | None
    status: str = "queued"  # queued | running | done | reused | failed | skipped
    note: str = ""
    wall_s: float = 0.0

    @property
    def name(self) -> str:
        return self.spec.key

    @property
    def ok(self) -> bool:
        return self.status in ("done", "reused")


@dataclass
class Outcome:
    plan: Plan
    jobs: list[TrainJob]
    cells: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    reports: list[Path] = field(default_factory=list)


def _root(path: str) -> Path:
    """Settings paths are relative to the repository (the folder above experiments/)."""
    from sparcode_cli.config import experiments_dir

    p = Path(path)
    return p if p.is_absolute() else experiments_dir().parent / p


def resolve(plan: Plan, mirror: str | None, out: Path) -> tuple[list[TrainJob], dict[TrainSpec, TrainJob]]:
    """Prepare the datasets and give every training spec its config and run id: the jobs (one per run id)
    and the job of every spec."""
    from sparcode_cli.models.encoders import is_order_aware

    folders: dict[tuple[str, str], Path] = {}
    by_spec: dict[TrainSpec, TrainJob] = {}
    by_id: dict[str, TrainJob] = {}
    result: list[TrainJob] = []
    sample_seed = int(plan.settings["sample_seed"])
    for spec in plan.trains:
        cfg = jobs.resolve_config(spec.model, spec.overrides)
        dkey = (spec.dataset, repr(sorted(cfg["data"].items())))
        if dkey not in folders:
            folders[dkey] = jobs.prepare_dataset(spec.dataset, cfg["data"], mirror)
        sample = int(plan.spec["eval_users"].get(spec.dataset, 0))
        ds = jobs.load(folders[dkey], sample, sample_seed)
        init = by_spec.get(spec.init_from) if spec.init_from is not None else None
        rid = jobs.expected_run_id(cfg, ds, init.run_id if init is not None else None)
        if rid in by_id:  # the same config twice (a sweep point equal to the main run): one run
            by_spec[spec] = by_id[rid]
            continue
        job = TrainJob(spec, cfg, rid, out / rid, folders[dkey], sample, init)
        encoder = cfg["model"].get("query_encoder")
        if encoder is not None and not ds.ordered and is_order_aware(encoder):
            job.status, job.note = "skipped", f"{ds.name} is unordered: {encoder} reads order"
        elif init is not None and init.status == "skipped":
            job.status, job.note = "skipped", "its warm-start run is skipped"
        else:
            state = jobs.run_state(job.run_dir)
            if state == "stale":  # made by other code: kept aside, trained again by this code
                from sparcode_cli.training.trainer import set_aside

                job.note = f"older code's run moved to {set_aside(job.run_dir)}"
            elif state == "finished":
                job.status, job.note = "reused", _note(job.run_dir, plan)
        by_spec[spec] = by_id[rid] = job
        result.append(job)
    return result, by_spec


def _note(run_dir: Path, plan: Plan) -> str:
    try:
        s = jobs.run_summary(run_dir)
    except (OSError, ValueError):
        return ""
    split = str(plan.settings["split"])
    r50 = (s.get(split) or {}).get("recall@50")
    head = f"{split} R@50 {r50:.4f} · " if r50 is not None else ""
    return head + f"{s.get('steps', 0)} steps · {s.get('train_time_s', 0):.0f} s train"


# Models that select their checkpoint on the eval_users sample of validation: the brute-force ceiling, whose
# exact scoring of every Gowalla user at every validation would cost more than its training. Every other model
# validates on all validation users (on Gowalla's 2,000-user sample the warm start and the trained SparCode were
# 0.004 Recall@20 apart in one direction, on all 29,858 users 0.001 in the other).
SAMPLED_VALIDATION = ("all-to-all",)


def _payload(job: TrainJob, plan: Plan, out: Path) -> dict[str, Any]:
    return {
        "folder": str(job.folder),
        "sample": job.sample if job.spec.model in SAMPLED_VALIDATION else 0,
        "sample_seed": int(plan.settings["sample_seed"]),
        "model": job.spec.model,
        "overrides": list(job.spec.overrides),
        "cfg": job.cfg,  # resolved when the plan was made; train.threads (not in the run id) is set from threads
        "out": str(out),
        "run_id": job.run_id,
        "init_from": str(job.init.run_dir) if job.init is not None else None,
        "threads": int(plan.settings["train_threads"]),
    }


def train_all(plan: Plan, todo: list[TrainJob], out: Path, view: Overview) -> None:
    """Train every queued job, `jobs` at a time; a job starts once its warm-start run is done."""
    n_workers = max(1, int(plan.settings["jobs"]))
    queued = [j for j in todo if j.status == "queued"]

    def ready() -> list[TrainJob]:
        out_ = []
        for j in queued:
            if j.status != "queued":
                continue
            if j.init is not None and j.init.status in ("failed", "skipped"):
                j.status, j.note = "failed", f"warm-start run {j.init.run_id} {j.init.status}"
                view.set(j.name, "failed", j.note)
                continue
            if j.init is None or j.init.ok:
                out_.append(j)
        return out_

    def finish(j: TrainJob, res: dict[str, Any]) -> None:
        if "error" in res:
            j.status, j.note = "failed", str(res["error"])
        else:
            j.status, j.note = "done", _note(j.run_dir, plan)
        view.set(j.name, j.status, j.note)

    if n_workers == 1:
        while True:
            r = ready()
            if not r:
                break
            j = r[0]
            j.status = "running"
            view.set(j.name, "running", log=j.run_dir / "train.log")
            res = jobs.train_job(_payload(j, plan, out))
            finish(j, res)
            if res.get("interrupted"):
                raise KeyboardInterrupt
        return

    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch / OpenMP state
    running: dict[Future[dict[str, Any]], TrainJob] = {}
    stop = False  # a run came back interrupted: start nothing new, let the others save and stop
    terminated = False

    def on_term(signum: int, frame: Any) -> None:
        nonlocal terminated
        terminated = True
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    prev_term = signal.signal(signal.SIGTERM, on_term) if main_thread else None
    pool = ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx)
    try:
        while True:
            for j in [] if stop else ready():
                if len(running) >= n_workers:
                    break
                j.status = "running"
                view.set(j.name, "running", log=j.run_dir / "train.log")
                running[pool.submit(jobs.train_job, _payload(j, plan, out))] = j
            if not running:
                break
            done, _ = wait(list(running), timeout=1.0, return_when=FIRST_COMPLETED)
            for f in done:
                j = running.pop(f)
                try:
                    res = f.result()
                except Exception as exc:  # a worker died (out of memory, killed)
                    res = {"error": f"worker failed: {type(exc).__name__}: {exc}"}
                stop = stop or bool(res.get("interrupted"))
                finish(j, res)
        if stop:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        if terminated:  # Ctrl-C reaches the workers by itself; SIGTERM does not: pass it on as SIGINT
            for p in list(getattr(pool, "_processes", {}).values()):
                with contextlib.suppress(OSError):
                    os.kill(p.pid, signal.SIGINT)
        pool.shutdown(wait=True, cancel_futures=True)  # each run saves checkpoint_last.pt and stops
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if main_thread:
            signal.signal(signal.SIGTERM, prev_term)


def evaluate_all(
    plan: Plan, job_of: dict[TrainSpec, TrainJob], view: Overview
) -> tuple[list[dict[str, Any]], list[str]]:
    """Evaluate every cell of the plan (cached cells are read back)."""
    import torch

    cells: list[dict[str, Any]] = []
    failures: list[str] = []
    split = str(plan.settings["split"])
    seed = int(plan.settings["sample_seed"])
    torch.set_num_threads(int(plan.settings["eval_threads"]))
    seen: set[Path] = set()
    for spec in plan.evals:
        job = job_of.get(spec.train)
        name = f"{spec.train.key} {spec.table}:{spec.key}" + (" (sample)" if spec.users == "sample" else "")
        if job is None or not job.ok:
            view.eval_step(name, failed="its run did not finish")
            continue
        path = jobs.cell_path(job.run_dir, spec, split)
        cached = jobs.read_cell(path)  # also a cell listed twice (a sweep point equal to a main cell)
        if cached is not None:
            cells.append(jobs.as_listed(cached, spec))
            view.eval_step(name, reused=path not in seen)
            seen.add(path)
            continue
        seen.add(path)
        view.eval_current = name
        sample = job.sample if spec.users == "sample" else 0
        try:
            ds = jobs.load(job.folder, sample, seed)
            cell = jobs.evaluate_cell(spec, job.run_dir, ds, plan.settings)
            cells.append(jobs.as_listed(cell, spec))
            view.eval_step(name)
        except UserError as exc:
            failures.append(f"{name}: {exc.message}")
            view.eval_step(name, failed=exc.message)
        except Exception as exc:  # keep going: the report says what is missing
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            view.eval_step(name, failed=str(exc))
    return cells, failures


def machine() -> dict[str, Any]:
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cores = os.cpu_count() or 1
    try:
        load1 = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        load1 = None
    return {
        "cores": cores,
        "load_avg_1m_at_end": load1,
        "cpu": platform.processor() or platform.machine(),
        "cpu_kernels": kernel_family(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def run_plan(
    plan: Plan,
    *,
    mirror: str | None = None,
    console: Console | None = None,
    report_only: bool = False,
) -> Outcome:
    """Train, evaluate and report `plan` (see the module docstring)."""
    import torch

    prev_threads = torch.get_num_threads()
    try:
        return _run_plan(plan, mirror, console or Console(stderr=True), report_only)
    finally:
        torch.set_num_threads(prev_threads)  # in-process training and evaluation set their own counts


def data_provenance(todo: list[TrainJob]) -> dict[str, list[dict[str, Any]]]:
    """dataset -> the processed folders its runs used: folder key (`data_hash`) and `content_digest`."""
    from sparcode_cli.data.store import read_meta

    seen: dict[str, dict[str, dict[str, Any]]] = {}
    for j in todo:
        meta = read_meta(j.folder)
        entry = {"data_hash": meta.get("data_hash"), "content_digest": meta.get("content_digest")}
        seen.setdefault(j.spec.dataset, {})[str(entry["data_hash"])] = entry
    return {d: list(by_key.values()) for d, by_key in seen.items()}


def _run_plan(plan: Plan, mirror: str | None, console: Console, report_only: bool) -> Outcome:
    from sparcode_cli.models import MODELS, model_class
    from sparcode_cli.reproduce import report

    for name in MODELS:  # import every model now: evaluation uses the code the runs were trained with
        model_class(name)

    t0 = time.perf_counter()
    out = _root(str(plan.settings["out"]))
    results = _root(str(plan.settings["results"]))
    out.mkdir(parents=True, exist_ok=True)
    todo, job_of = resolve(plan, mirror, out)

    title = (
        f"sparcode {plan.matrix}: {', '.join(plan.datasets)} · {plan.settings['jobs']} jobs x "
        f"{plan.settings['train_threads']} thread(s) · runs in {out}"
    )
    view = Overview(title, console)
    for j in todo:
        budget = 0
        for o in j.spec.overrides:
            if o.startswith("train.max_steps="):
                budget = int(o.split("=", 1)[1])
        view.add(j.name, budget)
        if j.status != "queued":
            view.rows[j.name].status, view.rows[j.name].note = j.status, j.note
    view.evals_total = len(plan.evals)
    outcome = Outcome(plan, todo)
    with view:
        if not report_only:
            train_all(plan, todo, out, view)
            view.phase = "eval"
            outcome.cells, outcome.failures = evaluate_all(plan, job_of, view)
        else:
            outcome.cells = report.cached_cells(plan, job_of, str(plan.settings["split"]))
        view.phase = "report"
        outcome.failures += [f"train {j.name}: {j.note}" for j in todo if j.status == "failed"]
        outcome.wall_s = time.perf_counter() - t0
        info = {
            "matrix": plan.matrix,
            "wall_s": outcome.wall_s,
            "trained_now": sum(1 for j in todo if j.status == "done"),
            "reused": sum(1 for j in todo if j.status == "reused"),
            "skipped": [f"{j.name}: {j.note}" for j in todo if j.status == "skipped"],
            "failures": outcome.failures,
            "machine": machine(),
            "settings": plan.settings,
            "max_steps": plan.spec.get("max_steps", {}),
            "dataset_max_steps": plan.spec.get("dataset_max_steps", {}),
            "dataset_set": plan.spec.get("dataset_set", {}),
            "seeds": plan.spec.get("seeds", []),
            "report_only": report_only,
            "git_commit": git_commit(),
            "code_digest": code_digest(),
            "data": data_provenance(todo),
        }
        for dataset in plan.datasets:
            cells = [c for c in outcome.cells if c["dataset"] == dataset]
            outcome.reports.append(report.write_report(dataset, cells, plan, info, results))
    return outcome
