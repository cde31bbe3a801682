"""The training loop shared by every model (DESIGN §2 "Training", §5 artifacts).

    from sparcode_cli.config import load_config
    from sparcode_cli.training.trainer import train
    cfg = load_config("two-tower", overrides=["train.epochs=5"])
    result = train(ds, cfg, out=Path("runs"))        # -> TrainResult (run_dir, valid/test metrics, ...)

A model plugs in through models/base.py: `train_output(q, pos, neg)` gives logits for each row's positive
(B,) and the batch's shared negatives (B, S) plus an already-weighted `aux_loss`; the loop subtracts the
logQ correction, masks accidental hits, takes the sampled softmax cross-entropy over [positive, negatives],
adds `aux_loss`, steps AdamW and calls `model.after_step()`. Every epoch (`eval_every_epochs`) validation is
ranked exactly (metrics.evaluate); early stopping watches validation Recall@20 (never test). Models with
`trainable = False` (popularity) only `fit(ds)`. Optional hooks: `epoch_stats()` (logged per epoch),
`init_from_run(checkpoint_dict, training_queries)` (warm start, `init_from=`: every training user's query is
given, e.g. for SparCode's k-means codebooks). A warm start is validated before the first step (epoch 0) and is
a candidate for the best checkpoint like every later epoch, so training never hands back less than its start on
validation.

Run folder `<out>/<run-id>/`: config.toml, meta.json, train.log, metrics.jsonl, checkpoint_best.pt,
checkpoint_last.pt, results.json (+ results_per_user.npz for the paired bootstrap).

Exact resume: the last checkpoint holds the model, the optimizer, the position (epoch, batch, step), the
torch/numpy/python RNG states and the loop's counters; the sampler's randomness is a pure function of
(seed, epoch, batch). So a run stopped at step N (`stop_at_step`, the CLI's --max-steps) and resumed ends
with the same weights and metrics as an uninterrupted one (same device and thread count).
"""

from __future__ import annotations

import json
import math
import random
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sparcode_cli import distributed as dd
from sparcode_cli.atomic import atomic_path, exclusive_lock, write_json, write_text
from sparcode_cli.config import config_hash, run_id, to_toml
from sparcode_cli.cpu_kernels import kernel_family
from sparcode_cli.data.dataset import Dataset
from sparcode_cli.data.queries import QueryBatch, training_queries
from sparcode_cli.devices import resolve_device
from sparcode_cli.errors import UserError
from sparcode_cli.metrics import DEFAULT_KS, EvalResult, evaluate, format_summary
from sparcode_cli.models import (
    attach_features,
    build_model,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from sparcode_cli.models.base import DataContext, Recommender, TrainOutput
from sparcode_cli.models.encoders import is_order_aware
from sparcode_cli.provenance import code_digest, git_commit, versions
from sparcode_cli.training.sampler import Batch, Sampler, accidental_hits

EARLY_STOP_METRIC = "recall@20"


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    run_dir: Path
    run_id: str
    status: str  # finished | early-stopped | max-steps | stopped | interrupted | fitted
    epochs: int
    steps: int
    best_epoch: int
    best_metric: float
    train_time_s: float  # time in training steps (evaluation excluded)
    samples_per_s: float
    valid: dict[str, float] | None = None
    test: dict[str, float] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


# -- the loss --------------------------------------------------------------------------------------------


def sampled_softmax_loss(
    out: TrainOutput, pos: torch.Tensor, neg: torch.Tensor, log_q: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of the positive against [positive, shared negatives], mean over the batch.

    The negatives' logits get the logQ correction (minus the log of their expected count under the proposal)
    and accidental hits (a negative equal to the row's positive) are masked to -inf.
    """
    neg_logits = out.neg_logits
    if log_q is not None:
        neg_logits = neg_logits - log_q.unsqueeze(0)
    neg_logits = neg_logits.masked_fill(accidental_hits(pos, neg), float("-inf"))
    logits = torch.cat([out.pos_logits.unsqueeze(1), neg_logits], dim=1)
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target)


# -- helpers ---------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _plain(obj: Any) -> Any:
    """numpy scalars / tensors -> python, recursively (JSON- and weights_only-safe)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


class _Log:
    """train.log (appended) plus the console; silent on every rank but 0 (path None)."""

    def __init__(self, path: Path | None, console: Console, quiet: bool) -> None:
        self.path, self.console, self.quiet = path, console, quiet

    def __call__(self, msg: str, *, echo: bool = True) -> None:
        if self.path is None:
            return
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(f"{stamp} {msg}\n")
        if echo and not self.quiet:
            self.console.print(msg, highlight=False, markup=False, soft_wrap=True)


class _SigintFlag:
    """First Ctrl-C sets a flag (the loop stops at the next batch boundary); a second one raises."""

    def __init__(self) -> None:
        self.flag = False
        self._prev: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True

    @contextmanager
    def installed(self) -> Iterator[_SigintFlag]:
        main = threading.current_thread() is threading.main_thread()
        if main:
            self._prev = signal.signal(signal.SIGINT, self._handler)
        try:
            yield self
        finally:
            if main:
                signal.signal(signal.SIGINT, self._prev)


def _progress(console: Console, enabled: bool) -> Progress | None:
    if not enabled or not console.is_terminal:
        return None  # not a TTY: one line per epoch, no live display
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[speed]} samples/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


# -- the run ---------------------------------------------------------------------------------------------


def train(
    ds: Dataset,
    cfg: dict[str, Any],
    out: str | Path = "runs",
    *,
    resume: bool = False,
    stop_at_step: int | None = None,
    init_from: str | Path | None = None,
    console: Console | None = None,
    progress: bool = True,
    quiet: bool = False,
    final_eval: bool = True,
) -> TrainResult:
    """Train `cfg["model"]["name"]` on `ds` into `<out>/<run-id>/`; evaluate the best checkpoint.

    resume: continue `<out>/<run-id>/checkpoint_last.pt` exactly. stop_at_step: stop (saving the last
    checkpoint) once the run has done this many optimiser steps in total; not part of the run id.
    init_from: a run folder or checkpoint whose dict is passed to `model.init_from_run` (warm start).
    """
    console = console or Console(stderr=True)
    encoder = cfg["model"].get("query_encoder")
    if not ds.ordered and encoder is not None and is_order_aware(encoder):
        raise UserError(
            f"model.query_encoder = {encoder!r} reads the order of the history, but dataset {ds.name!r} is unordered",
            hint="use --set model.query_encoder=dnn for this dataset",
        )

    init_ckpt = None
    ident = ds.data_hash
    if init_from is not None:
        init_ckpt = load_checkpoint(init_from)
        ident = f"{ds.data_hash}|init={init_ckpt.get('run_id') or config_hash(init_ckpt['config'], '', 0)}"
    rid = run_id(cfg, ds.name, ident)
    run_dir = Path(out) / rid
    last_path = run_dir / "checkpoint_last.pt"
    # an unusable device fails before the run folder exists
    resolve_device(str(cfg["train"].get("device", "auto")), "train.device")
    if resume and not last_path.is_file():
        raise UserError(
            f"nothing to resume: {last_path} does not exist", hint="run without --resume to start it"
        )
    # under torchrun rank 0 owns the run folder; the others only read it
    with exclusive_lock(run_dir, f"run folder {run_dir}") if dd.is_main() else _null():
        if not resume and last_path.is_file():
            raise UserError(
                f"run {rid} already exists in {run_dir}",
                hint="pass --resume to continue it, or remove the folder / use another --out to start over",
            )
        if resume:
            check_same_code(run_dir)
        return _train_locked(
            ds, cfg, rid, run_dir, resume, stop_at_step, init_from, init_ckpt, console, progress, quiet,
            final_eval,
        )  # fmt: skip


def _recorded_code(run_dir: Path) -> dict[str, Any]:
    meta_path = run_dir / "meta.json"
    try:
        return json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    except (OSError, ValueError):
        return {}


def check_same_code(run_dir: Path) -> None:
    """Refuse to continue a run that other code started: its numbers would come from two codes."""
    old = _recorded_code(run_dir)
    if old.get("code_digest") != code_digest():
        raise UserError(
            f"run {run_dir.name} was started by other code (code digest {old.get('code_digest')}, commit "
            f"{old.get('git_commit')}; this checkout: {code_digest()}): resuming would mix the two",
            hint="remove the run folder (or use another --out) to train it with this code",
        )


def run_state(run_dir: Path) -> str:
    """'finished' (results.json), 'partial' (a last checkpoint to resume), 'new', or 'stale': the folder was
    made by other code (its meta.json's code digest differs, or it has none), so nothing in it may be reused."""
    has_results = (run_dir / "results.json").is_file()
    has_last = (run_dir / "checkpoint_last.pt").is_file()
    if (has_results or has_last) and _recorded_code(run_dir).get("code_digest") != code_digest():
        return "stale"
    return "finished" if has_results else "partial" if has_last else "new"


def set_aside(run_dir: Path) -> Path:
    """Move a stale run folder to `<out>/stale/<run-id>-<its code digest>[-n]` (kept, never deleted), so the
    run id is free to be trained by this code. Returns where it went."""
    tag = _recorded_code(run_dir).get("code_digest") or "undigested"
    dest = run_dir.parent / "stale" / f"{run_dir.name}-{tag}"
    n = 1
    while dest.exists():
        n += 1
        dest = run_dir.parent / "stale" / f"{run_dir.name}-{tag}-{n}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(run_dir, f"run folder {run_dir}"):
        run_dir.rename(dest)
    return dest


def _train_locked(
    ds: Dataset,
    cfg: dict[str, Any],
    rid: str,
    run_dir: Path,
    resume: bool,
    stop_at_step: int | None,
    init_from: str | Path | None,
    init_ckpt: dict[str, Any] | None,
    console: Console,
    progress: bool,
    quiet: bool,
    final_eval: bool,
) -> TrainResult:
    name = str(cfg["model"]["name"])
    tc, mc = cfg["train"], cfg["model"]
    last_path, best_path = run_dir / "checkpoint_last.pt", run_dir / "checkpoint_best.pt"
    main = dd.is_main()
    log = _Log(run_dir / "train.log" if main else None, console, quiet)

    if int(tc.get("threads", 0)) > 0:
        torch.set_num_threads(int(tc["threads"]))
    device = resolve_device(str(tc.get("device", "auto")), "train.device")
    seed = int(tc["seed"])
    seed_everything(seed)

    ctx = DataContext.from_dataset(ds)
    model = build_model(name, mc, ctx)
    attach_features(model, ds.features)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())

    meta = {
        "run_id": rid,
        "model": name,
        "dataset": ds.name,
        "data_hash": ds.data_hash,
        "ordered": ds.ordered,
        "n_users": ds.n_users,
        "n_items": ds.n_items,
        "seed": seed,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "n_params": n_params,
        "init_from": str(init_from) if init_from is not None else None,
        "code_digest": code_digest(),
        "git_commit": git_commit(),
        "content_digest": ds.meta.get("content_digest"),
        "versions": versions(),
        "cpu_kernels": kernel_family(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if dd.is_distributed():
        meta["world_size"] = dd.world_size()
    if main and not resume:
        write_text(run_dir / "config.toml", to_toml(cfg, header=f"resolved config of run {rid}"))
        write_json(run_dir / "meta.json", meta)
    elif main:
        old = json.loads((run_dir / "meta.json").read_text()) if (run_dir / "meta.json").is_file() else {}
        old.setdefault("resumed", []).append(meta["started"])
        meta = {**meta, **{k: old[k] for k in ("started", "init_from", "resumed") if k in old}}
        write_json(run_dir / "meta.json", meta)
    log(
        f"run {rid}: model {name}, dataset {ds.name} ({ds.n_users} users, {ds.n_items} items), "
        f"{n_params:,} parameters, device {device}, {torch.get_num_threads()} threads"
        + (f" x {dd.world_size()} processes" if dd.is_distributed() else "")
        + (" [resumed]" if resume else "")
    )

    common = {"dataset": ds.name, "data_hash": ds.data_hash, "run_id": rid, "init_from": meta["init_from"]}
    if not model.trainable:
        return _fit_only(model, ds, cfg, run_dir, log, common, tc, device, final_eval)

    sampler = Sampler(
        ds.train,
        ds.features.user_feats,
        ds.n_items,
        ordered=ds.ordered,
        max_history=int(mc.get("max_history", 50)),
        batch_size=int(tc["batch_size"]),
        negatives=str(tc["negatives"]),
        n_negatives=int(tc["n_negatives"]),
        logq=bool(tc.get("logq", True)),
        seed=seed,
    )
    if sampler.batch_size < dd.world_size():
        raise UserError(
            f"train.batch_size = {sampler.batch_size} is smaller than the {dd.world_size()} processes: "
            "each takes a slice of the batch",
            hint="raise train.batch_size or start fewer processes",
        )
    opt = torch.optim.AdamW(model.parameters(), lr=float(tc["lr"]), weight_decay=float(tc["weight_decay"]))

    st: dict[str, Any] = {
        "epoch": 0,
        "batch": 0,
        "step": 0,
        "best_metric": -math.inf,
        "best_epoch": 0,
        "bad_evals": 0,
        "history": [],
        "train_time_s": 0.0,
        "samples": 0,
        "epoch_loss_sum": 0.0,
        "epoch_batches": 0,
        "epoch_samples": 0,
        "epoch_time_s": 0.0,
        "done": False,
        "status": "running",
    }
    if resume:
        ck = load_checkpoint(last_path, map_location=device)
        model.load_state_dict(ck["state_dict"])
        opt.load_state_dict(ck["optimizer"])
        for k in st:
            if k in ck:
                st[k] = ck[k]
        if ck.get("rng") is not None:
            set_rng_state(ck["rng"])
        log(f"resumed at epoch {st['epoch'] + 1}, batch {st['batch']}, step {st['step']}")
    elif init_ckpt is not None:
        hook = getattr(model, "init_from_run", None)
        if hook is None:
            raise UserError(f"model {name!r} cannot start from another run (--init-from)")
        hook(init_ckpt, training_queries(ds, int(mc.get("max_history", 50))))
        log(f"initialised from {init_from}")
        td, d = getattr(model, "token_dim", None), int(mc.get("dim", 0))
        if td is not None and td < d:
            log(
                f"warning: model.token_dim = {td} < model.dim = {d}: the warm start's tokens keep only the "
                f"first {td} dimensions of the two-tower's vectors and start below it; set model.token_dim={d}"
            )
    if float(mc.get("distill", 0.0)) > 0 and not getattr(model, "has_teacher", lambda: True)():
        log(
            f"note: model.distill = {mc['distill']} distils from the two-tower of a warm start (--init-from); "
            "this run has none and trains without the term"
        )
    step_fn = _data_parallel(model, device)

    def checkpoint(path: Path) -> None:
        if main:
            save_checkpoint(path, make_checkpoint(model, cfg, optimizer=opt, **common, **_plain(st)))

    def write_history() -> None:
        if not main:
            return
        with atomic_path(run_dir / "metrics.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(h) + "\n" for h in st["history"]), encoding="utf-8")

    def run_eval(tag: str, epoch: int) -> dict[str, float]:
        res = evaluate(model, ds, "valid", DEFAULT_KS, batch_size=int(tc["eval_batch_size"]), device=device)
        metric = res.summary[EARLY_STOP_METRIC]
        if not model.selectable():
            return {**res.summary, "_tag": tag + " (warm-up)"}
        if metric > st["best_metric"]:
            st["best_metric"], st["best_epoch"], st["bad_evals"] = metric, epoch, 0
            tag += " *"
            checkpoint(best_path)
        else:
            st["bad_evals"] += 1
        return {**res.summary, "_tag": tag}

    def end_of_epoch(partial: bool) -> None:
        """Evaluate (when due), log, checkpoint; `partial` = stopped by train.max_steps mid-epoch."""
        n, t = max(st["epoch_batches"], 1), max(st["epoch_time_s"], 1e-9)
        epoch_no = st["epoch"] + 1 if partial else st["epoch"]  # 1-based number of the epoch just run
        row: dict[str, Any] = {
            "epoch": epoch_no,
            "step": st["step"],
            "loss": st["epoch_loss_sum"] / n,
            "samples": st["epoch_samples"],
            "samples_per_s": st["epoch_samples"] / t,
            "epoch_time_s": st["epoch_time_s"],
            "lr": opt.param_groups[0]["lr"],
        }
        if partial:
            row["partial_epoch"] = True
        every = max(int(tc["eval_every_epochs"]), 1)
        due = partial or st["epoch"] % every == 0 or st["epoch"] >= int(tc["epochs"])
        msg = f"epoch {epoch_no:>3} step {st['step']:>6} loss {row['loss']:.4f} ({row['samples_per_s']:,.0f} samples/s)"
        if due:
            v = run_eval("", epoch_no)
            tag = v.pop("_tag")
            row["valid"] = v
            msg += f"  valid {format_summary(v, ('recall@20', 'ndcg@20', 'recall@50'))}{tag}"
        stats = _plain(model.epoch_stats())
        if stats:
            row["model"] = stats
            msg += "  " + " ".join(
                f"{k}={_fmt(v)}" for k, v in stats.items() if not isinstance(v, dict | list)
            )
        st["history"].append(row)
        st["epoch_loss_sum"], st["epoch_batches"], st["epoch_samples"], st["epoch_time_s"] = 0.0, 0, 0, 0.0
        log(msg)

    epochs = int(tc["epochs"])
    budget = int(tc.get("max_steps", 0)) or None
    grad_clip = float(tc.get("grad_clip", 0.0))
    nb = sampler.batches_per_epoch()
    if not resume:
        log(
            f"{sampler.n_samples:,} training samples, {nb} batches of {sampler.batch_size} per epoch, "
            f"negatives {tc['negatives']} ({tc['n_negatives']}), up to {epochs} epochs"
            + (f" / {budget} steps" if budget else "")
        )
    if init_ckpt is not None and not resume:
        # the warm start is a checkpoint like any other: training keeps it unless it does better on validation
        v = run_eval(" (warm start)", 0)
        tag = v.pop("_tag")
        st["history"].append({"epoch": 0, "step": 0, "valid": v})
        log(f"epoch   0 step      0  valid {format_summary(v, ('recall@20', 'ndcg@20', 'recall@50'))}{tag}")
        write_history()
    stop_reason = "finished"
    sig = _SigintFlag()
    halt = _Halt()
    bar = _progress(console, progress and not quiet)
    model.train()
    with sig.installed(), bar if bar is not None else _null():
        task = bar.add_task("", total=nb, loss="-", speed="-") if bar is not None else None
        while not st["done"] and st["epoch"] < epochs:
            order = sampler.epoch_order(st["epoch"])
            if bar is not None:
                bar.reset(
                    task, total=nb, completed=st["batch"], description=f"epoch {st['epoch'] + 1}/{epochs}"
                )
            stopped = None
            while st["batch"] < nb:
                if budget is not None and st["step"] >= budget:
                    stopped = "max-steps"
                    break
                if stop_at_step is not None and st["step"] >= stop_at_step:
                    stopped = "stopped"
                    break
                if halt.get(sig.flag):
                    stopped = "interrupted"
                    break
                t0 = time.perf_counter()
                batch = sampler.batch(st["epoch"], st["batch"], order)
                b_global = len(batch.pos)
                batch = _rank_slice(batch).to(device)
                out_ = step_fn(batch.query, batch.pos, batch.neg)
                loss = sampled_softmax_loss(out_, batch.pos, batch.neg, batch.log_q) + out_.aux_loss
                if dd.is_distributed():
                    # the ranks' gradients are averaged: weight each slice's mean by its share of the batch, so
                    # the step is the global batch's mean; the logged loss and the stop flag are agreed on
                    loss = loss * (len(batch.pos) * dd.world_size() / b_global)
                    agreed = torch.stack(
                        [loss.detach().cpu() / dd.world_size(), torch.tensor(float(sig.flag))]
                    )
                    dd.all_reduce_sum_(agreed)
                    loss_value, halt.agreed = float(agreed[0]), bool(agreed[1] > 0)
                else:
                    loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise TrainingDiverged(
                        f"training diverged: the loss is {loss_value} at epoch {st['epoch'] + 1}, "
                        f"step {st['step'] + 1} (run {rid})",
                        hint=f"lower train.lr (now {tc['lr']}) or set train.grad_clip (e.g. 1.0); "
                        "checkpoint_last.pt (if any) holds the last good epoch",
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                opt.step()
                model.after_step()
                _sync_rng()
                dt = time.perf_counter() - t0
                b = b_global
                st["step"] += 1
                st["batch"] += 1
                st["samples"] += b
                st["train_time_s"] += dt
                st["epoch_loss_sum"] += loss_value
                st["epoch_batches"] += 1
                st["epoch_samples"] += b
                st["epoch_time_s"] += dt
                if bar is not None:
                    bar.update(
                        task,
                        advance=1,
                        loss=f"{st['epoch_loss_sum'] / st['epoch_batches']:.4f}",
                        speed=f"{st['epoch_samples'] / max(st['epoch_time_s'], 1e-9):,.0f}",
                    )
            if stopped in ("stopped", "interrupted"):
                stop_reason = stopped
                break
            if stopped == "max-steps":
                if (
                    st["epoch_batches"] > 0
                ):  # the budget ended mid-epoch (not exactly at the last epoch's end)
                    end_of_epoch(partial=True)
                st["done"], stop_reason = True, "max-steps"
            else:
                st["epoch"] += 1
                st["batch"] = 0
                end_of_epoch(partial=False)
                if int(tc["patience"]) > 0 and st["bad_evals"] >= int(tc["patience"]):
                    st["done"], stop_reason = True, "early-stopped"
                    log(
                        f"early stop: no better validation {EARLY_STOP_METRIC} for {st['bad_evals']} evaluations"
                    )
                elif st["epoch"] >= epochs:
                    st["done"] = True
            st["status"] = stop_reason if st["done"] else "running"
            checkpoint(last_path)
            write_history()
            halt.agreed = _agree(sig.flag)
            if halt.get(sig.flag) and not st["done"]:
                stop_reason = "interrupted"
                break
        if st["epoch"] >= epochs and not st["done"]:  # resumed a finished run
            st["done"] = True
    if stop_reason in ("stopped", "interrupted"):
        st["status"] = stop_reason
        checkpoint(last_path)
        write_history()
        if stop_reason == "interrupted":
            log(
                f"interrupted at epoch {st['epoch'] + 1}, step {st['step']}: checkpoint_last.pt saved; "
                "continue with --resume"
            )
        else:
            log(f"stopped at step {st['step']} (--max-steps); continue with --resume")
    elif stop_reason == "finished":
        stop_reason = str(st.get("status")) if st.get("status") not in ("running", None) else "finished"

    samples_per_s = st["samples"] / max(st["train_time_s"], 1e-9)
    result = TrainResult(
        run_dir=run_dir,
        run_id=rid,
        status=stop_reason,
        epochs=st["epoch"],
        steps=st["step"],
        best_epoch=st["best_epoch"],
        best_metric=st["best_metric"],
        train_time_s=st["train_time_s"],
        samples_per_s=samples_per_s,
        history=st["history"],
    )
    if stop_reason == "interrupted" or not final_eval:
        return result
    dd.barrier()  # rank 0 has written the best checkpoint
    if best_path.is_file():
        model.load_state_dict(load_checkpoint(best_path, map_location=device)["state_dict"])
    _final_eval(model, ds, run_dir, log, result, tc, device)
    return result


def _rank_slice(batch: Batch) -> Batch:
    """This rank's rows of the global batch; the shared negatives (and their logQ) stay whole, so in-batch
    negatives are the global batch's positives on every rank."""
    if not dd.is_distributed():
        return batch
    lo, hi = dd.shard(len(batch.pos))
    q = batch.query
    users = None if q.users is None else q.users[lo:hi]
    return Batch(
        QueryBatch(q.history[lo:hi], q.user_feats[lo:hi], users), batch.pos[lo:hi], batch.neg, batch.log_q
    )


class _TrainForward(torch.nn.Module):
    """What DistributedDataParallel wraps: its forward is the model's training output."""

    def __init__(self, model: Recommender) -> None:
        super().__init__()
        self.model = model

    def forward(self, q: QueryBatch, pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.train_output(q, pos, neg)
        return out.pos_logits, out.neg_logits, out.aux_loss


def _data_parallel(model: Recommender, device: torch.device) -> Any:
    """The training forward: the model itself in one process; under torchrun, every rank starts from rank 0's
    parameters and buffers and DDP all-reduces the gradients (buffers are not re-broadcast per step: the
    codebooks' statistics are all-reduced by the quantizer itself)."""
    if not dd.is_distributed():
        return model.train_output
    with torch.no_grad():
        for t in model.state_dict().values():
            dd.broadcast_(t)
    _sync_rng()
    ids = [device.index] if device.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel(
        _TrainForward(model), device_ids=ids, forward_sync_buffers=False
    )

    def step(q: QueryBatch, pos: torch.Tensor, neg: torch.Tensor) -> TrainOutput:
        return TrainOutput(*ddp(q, pos, neg))

    return step


class _Halt:
    """Whether to stop for a Ctrl-C: the flag itself in one process; under torchrun only what the ranks last
    agreed on, so that no rank leaves the loop alone."""

    agreed = False

    def get(self, flag: bool) -> bool:
        return self.agreed if dd.is_distributed() else flag


def _agree(flag: bool) -> bool:
    """True on every rank when it is true on any (a Ctrl-C reaches the ranks at different moments)."""
    if not dd.is_distributed():
        return flag
    return bool(dd.all_reduce_sum_(torch.tensor([float(flag)])) > 0)


def _sync_rng() -> None:
    """Rank 0's torch RNG state on every rank: what the ranks draw alike (SparCode's probe items, codebook
    restarts) stays alike even when their slices differ in size."""
    if dd.is_distributed():
        state = torch.get_rng_state()
        dd.broadcast_(state)
        torch.set_rng_state(state)
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # draws on the GPU use its generator
            cuda_state = torch.cuda.get_rng_state()
            dd.broadcast_(cuda_state)
            torch.cuda.set_rng_state(cuda_state)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@contextmanager
def _null() -> Iterator[None]:
    yield None


def _fit_only(
    model: Recommender,
    ds: Dataset,
    cfg: dict[str, Any],
    run_dir: Path,
    log: _Log,
    common: dict[str, Any],
    tc: dict[str, Any],
    device: torch.device,
    final_eval: bool,
) -> TrainResult:
    """Models without a training loop (popularity): fit, checkpoint, evaluate."""
    t0 = time.perf_counter()
    model.fit(ds)  # type: ignore[attr-defined]
    dt = time.perf_counter() - t0
    ck = make_checkpoint(model, cfg, epoch=0, batch=0, step=0, status="fitted", train_time_s=dt, **common)
    if dd.is_main():
        save_checkpoint(run_dir / "checkpoint_best.pt", ck)
        save_checkpoint(run_dir / "checkpoint_last.pt", ck)
    log(f"fitted in {dt:.2f} s")
    result = TrainResult(run_dir, run_dir.name, "fitted", 0, 0, 0, float("nan"), dt, 0.0)
    if final_eval:
        _final_eval(model, ds, run_dir, log, result, tc, device)
    if final_eval and dd.is_main():
        with atomic_path(run_dir / "metrics.jsonl") as tmp:
            tmp.write_text(json.dumps({"epoch": 0, "valid": result.valid}) + "\n", encoding="utf-8")
    return result


def _final_eval(
    model: Recommender,
    ds: Dataset,
    run_dir: Path,
    log: _Log,
    result: TrainResult,
    tc: dict[str, Any],
    device: torch.device,
) -> None:
    """Validation and test metrics of the (best) model by exact full ranking, into results.json."""
    t0 = time.perf_counter()
    res: dict[str, EvalResult] = {}
    for split in ("valid", "test"):
        res[split] = evaluate(
            model, ds, split, DEFAULT_KS, batch_size=int(tc["eval_batch_size"]), device=device
        )
    result.valid, result.test = res["valid"].summary, res["test"].summary
    eval_s = time.perf_counter() - t0
    if not dd.is_main():
        return
    write_json(
        run_dir / "results.json",
        {
            "run_id": result.run_id,
            "status": result.status,
            "epochs": result.epochs,
            "steps": result.steps,
            "best_epoch": result.best_epoch,
            "train_time_s": round(result.train_time_s, 3),
            "samples_per_s": round(result.samples_per_s, 1),
            "eval_time_s": round(eval_s, 3),
            "valid": result.valid,
            "test": result.test,
        },
    )
    arrays: dict[str, np.ndarray] = {}
    for split, r in res.items():
        arrays[f"{split}.users"] = r.users
        for k, v in r.per_user.items():
            arrays[f"{split}.{k}"] = v
    with atomic_path(run_dir / "results_per_user.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    log(
        f"best epoch {result.best_epoch}: valid {format_summary(result.valid, ('recall@20', 'ndcg@20'))}  "
        f"test {format_summary(result.test, ('recall@20', 'ndcg@20', 'recall@50', 'ndcg@50'))}",
        echo=False,
    )
