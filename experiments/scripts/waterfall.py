"""Gap decomposition ("waterfall") of SparCode against the two-tower run it is warm-started from.

For every (dataset, query encoder, seed) found in the runs folders (main configs only: interaction mlp, the
default n_codewords / k_u of experiments/sparcode.toml, not the codebook-sweep budget), the test split is
ranked by `metrics.evaluate` (full ranking, every query item masked) at each step:

    1   two-tower (exact)           the two-tower run's best checkpoint
    1a  warm-start tokens, unquantized SparCode's warm start, its K_u user tokens unquantized, scored
                                     sum_k g(z_k, i) (= all-to-all at step 0; g = dot path, h = 0)  [diagnostic]
    2a  quantized, raw sum g         the same with the quantized tokens ẑ_k: sum_k g(ẑ_k, i), rows not
                                     standardised                                                   [diagnostic]
    2   quantized, no cut            the warm start scored with row density 1.0: sum_k g~(ẑ_k, i), every code
                                     row standardised over items (the model's own dense score: what its
                                     dense_loss trains, and step 3 without the cut)
    3   + cut at target density      the warm start, every code row cut at target_density
    4a  trained, no cut              the trained SparCode run's best checkpoint at row density 1.0   [diagnostic]
    4   trained SparCode             the trained SparCode run's best checkpoint (cut, exact model scoring),
                                     one code per user token
    4p  + multi-probe serving        the same checkpoint as served: each token reads its model.probes
                                     nearest codes' rows (only when the run's model.probes > 1)
    5   all-to-all (exact)           the trained all-to-all run (same two-tower warm start, same seed)

Steps 2a-4 read one code per user token (the code trained on), whatever the run's model.probes, so 1 -> 4
measures quantization, the cut and training, and 4 -> 4p the serving option alone.

The warm start is rebuilt as the trainer builds it (seeded with the SparCode run's seed, its model config, the
two-tower checkpoint through `init_from_run`, so the token heads are the run's initial ones), except that the
codebooks come from k-means of every training user's tokens (the trainer uses its first batch).

Candidate recall (steps 3, 4 and 4p, which retrieve from a cut index): per test user the fraction of its target
items with a positive score, i.e. in the union over its K_u code rows (K_u x P at 4p) of the items kept by the cut (query
items masked, as for Recall), averaged over users like Recall. "set" is the mean size of that retrievable set
as a percentage of the catalogue.

On datasets with `[reproduce-full.eval_users]` in experiments/reproduce.toml (Gowalla) every step is scored on
the same fixed seeded test-user sample as the reproduce-full matrix (`reproduce.jobs.load`).

    OMP_NUM_THREADS=1 SPARCODE_HOME=<home> .venv/bin/python experiments/scripts/waterfall.py \
        --runs <runs folder> [--runs <another>] [--seeds 0,1,2] --out experiments/results/waterfall.md
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import statistics
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sparcode_cli.config import load_config
from sparcode_cli.data.dataset import Dataset
from sparcode_cli.data.queries import last_items, query_batch, training_queries
from sparcode_cli.metrics import evaluate
from sparcode_cli.models import attach_features, build_model, load_checkpoint, model_from_checkpoint
from sparcode_cli.models.base import DataContext, QueryBatch
from sparcode_cli.models.sparcode import SparCode
from sparcode_cli.paths import processed_root
from sparcode_cli.reproduce import jobs
from sparcode_cli.reproduce.matrix import codebook_grid, expand
from sparcode_cli.training.trainer import seed_everything

REPO = Path(__file__).resolve().parents[2]
KS = (20, 50)
SPLIT = "test"


@dataclass(frozen=True)
class Step:
    key: str
    label: str
    diagnostic: bool = False
    cut: bool = False  # retrieves from a cut index: candidate recall applies


STEPS = (
    Step("1", "two-tower (exact)"),
    Step("1a", "warm-start tokens, unquantized, sum g", diagnostic=True),
    Step("2a", "quantized, raw sum g (rows not standardised)", diagnostic=True),
    Step("2", "quantized user tokens, no cut"),
    Step("3", "+ cut at target density (warm start)", cut=True),
    Step("4a", "trained SparCode, no cut", diagnostic=True),
    Step("4", "trained SparCode, 1 code per token", cut=True),
    Step("4p", "+ multi-probe serving (as served)", cut=True),
    Step("5", "all-to-all (exact)"),
)


# -- runs --------------------------------------------------------------------------------------------------
@dataclass
class Run:
    path: Path
    meta: dict[str, Any]
    config: dict[str, Any]
    results: dict[str, Any]

    @property
    def run_id(self) -> str:
        return str(self.meta["run_id"])

    @property
    def model(self) -> str:
        return str(self.meta["model"])

    @property
    def init_id(self) -> str | None:
        init = self.meta.get("init_from")
        return Path(init).name if init else None

    def model_cfg(self, key: str, default: Any = None) -> Any:
        return self.config.get("model", {}).get(key, default)


@dataclass
class Triple:
    """The runs of one waterfall: a two-tower run and the SparCode / all-to-all runs started from it."""

    dataset: str
    encoder: str
    seed: int
    two_tower: Run
    sparcode: Run
    all_to_all: Run | None


def read_runs(folders: list[Path]) -> tuple[dict[str, Run], list[str]]:
    """Finished runs (with results.json) by run id; a run id met twice keeps the first folder's copy."""
    runs: dict[str, Run] = {}
    notes: list[str] = []
    dupes: list[str] = []
    for folder in folders:
        for d in sorted(folder.iterdir()):
            if not (d / "meta.json").is_file() or not (d / "config.toml").is_file():
                continue
            meta = json.loads((d / "meta.json").read_text())
            if not (d / "results.json").is_file() or not (d / "checkpoint_best.pt").is_file():
                notes.append(f"skipped unfinished run {d.name}")
                continue
            if meta["run_id"] in runs:
                kept = runs[meta["run_id"]]
                same = json.loads((d / "results.json").read_text()).get("test") == kept.results.get("test")
                dupes.append(f"{meta['run_id']}{'' if same else ' (**different test results**)'}")
                continue
            config = tomllib.loads((d / "config.toml").read_text())
            runs[meta["run_id"]] = Run(d, meta, config, json.loads((d / "results.json").read_text()))
    if dupes:
        notes.append(
            f"{len(dupes)} run ids are in more than one runs folder; the first folder's copy is used (test "
            f"results identical unless said): {', '.join(dupes)}"
        )
    return runs, notes


def is_main_sparcode(run: Run, defaults: dict[str, Any], sweep_steps: int) -> bool:
    """SparCode with interaction mlp and its dataset's main codebook (`main_config`), not a codebook-sweep point."""
    return (
        run.model_cfg("interaction") == "mlp"
        and all(run.model_cfg(k) == defaults[k] for k in ("n_codewords", "k_u", "m"))
        and int(run.config["train"]["max_steps"]) != sweep_steps
    )


@functools.cache
def main_config(dataset: str) -> tuple[dict[str, Any], int]:
    """(SparCode's model config, the codebook sweep's step budget) of `dataset`'s main runs, as the reproduce-full
    matrix trains them (its dataset_set recipe, e.g. Gowalla's flat codebook, and the dataset's codebook grid)."""
    plan = expand("reproduce-full", datasets=[dataset])
    main = next(t for t in plan.trains if t.model == "sparcode" and not t.variant)
    model = load_config("sparcode", overrides=list(main.overrides))["model"]
    return model, int(codebook_grid(plan.sweeps["codebook"], dataset).get("max_steps", 0))


def group_runs(runs: dict[str, Run], notes: list[str]) -> list[Triple]:
    triples = []
    for sp in runs.values():
        if sp.model != "sparcode" or not is_main_sparcode(sp, *main_config(str(sp.meta["dataset"]))):
            continue
        tt = runs.get(sp.init_id or "")
        if tt is None:
            notes.append(f"{sp.run_id}: its two-tower run {sp.init_id} is not among the runs, skipped")
            continue
        a2a = [
            r
            for r in runs.values()
            if r.model == "all-to-all" and r.init_id == tt.run_id and r.model_cfg("interaction") == "mlp"
        ]
        if len(a2a) > 1:
            raise SystemExit(f"several all-to-all runs start from {tt.run_id}: {[r.run_id for r in a2a]}")
        triples.append(
            Triple(
                sp.meta["dataset"],
                str(sp.model_cfg("query_encoder")),
                int(sp.meta["seed"]),
                tt,
                sp,
                a2a[0] if a2a else None,
            )
        )
    keys = [(t.dataset, t.encoder, t.seed) for t in triples]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        raise SystemExit(f"several main SparCode runs for {sorted(dup)}")
    return sorted(triples, key=lambda t: (t.dataset, t.encoder, t.seed))


# -- data ----------------------------------------------------------------------------------------------------
def load_data(data_hash: str, sample: int, seed: int) -> tuple[Dataset, dict[str, Any]]:
    folder = processed_root() / data_hash
    meta = json.loads((folder / "meta.json").read_text())
    return jobs.load(folder, sample, seed), meta


# -- models --------------------------------------------------------------------------------------------------
class DenseSum(nn.Module):
    """sum_k g(z_k, i) of a SparCode model's user tokens over every item, no row normalisation and no cut:
    z_k unquantized (`quantized` False: all-to-all scoring of SparCode's tokens) or the quantized ẑ_k."""

    exclude_nonpositive = False

    def __init__(self, model: SparCode, quantized: bool) -> None:
        super().__init__()
        self.m, self.quantized, self.cfg = model, quantized, model.cfg
        self.eval()  # evaluate() restores the mode it found: a wrapper left in training would put m in it

    @torch.no_grad()
    def score_all(self, q: QueryBatch) -> Tensor:
        m = self.m
        _, side = m._all_items()
        if self.quantized:
            uniq, inv = torch.unique(m.codes(q), return_inverse=True)  # (U,), (B, K_u)
            rows = m.interaction.table_chunked(m.quantizer.decode(uniq), side)  # (U, n_items + 1)
            out = rows[inv].sum(1)
        else:
            z = m.user_tokens(q).reshape(-1, m.token_dim)
            out = m.interaction.table_chunked(z, side).reshape(len(q), m.k_u, -1).sum(1)
        out[:, 0] = float("-inf")
        return out


def warm_start(tt: Run, sp: Run, ds: Dataset, overrides: dict[str, Any] | None = None) -> SparCode:
    """SparCode's untrained warm start as its trainer builds it (seed, config, `init_from_run`), codebooks by
    k-means of every training user's tokens; `overrides` replace model config keys (warm_start_seeds.py's grid)."""
    cfg = {
        **load_checkpoint(sp.path / "checkpoint_best.pt")["config"]["model"],
        "probes": 1,
        **(overrides or {}),
    }
    seed_everything(int(sp.meta["seed"]))
    m = build_model("sparcode", cfg, DataContext.from_dataset(ds))
    assert isinstance(m, SparCode)
    attach_features(m, ds.features)
    m.init_from_run(
        load_checkpoint(tt.path / "checkpoint_best.pt"), training_queries(ds, int(cfg["max_history"]))
    )
    m.n_steps.fill_(m.density_warmup)  # past the density warm-up
    return m.eval()


def trained(run: Run) -> nn.Module:
    return model_from_checkpoint(load_checkpoint(run.path / "checkpoint_best.pt"))


def one_probe(m: SparCode) -> SparCode:
    """The model reading one code per token, the code it was trained on."""
    m.probes = 1
    return m


def with_density(m: SparCode, density: float) -> SparCode:
    m.row_density.fill_(density)
    m.clear_cache()
    return m


# -- metrics -------------------------------------------------------------------------------------------------
@dataclass
class Cell:
    r20: float
    r50: float
    cand: float | None = None  # candidate recall
    set_frac: float | None = None  # mean retrievable set / n_items
    n_users: int = 0  # evaluated users (with targets)
    seconds: float = 0.0


@torch.no_grad()
def candidate_recall(model: SparCode, ds: Dataset, batch_size: int = 512) -> tuple[float, float]:
    """(mean over test users with targets of |targets ∩ retrievable| / |targets|, mean |retrievable| / n_items),
    retrievable = a positive exact score, query items masked (as `metrics.evaluate` masks them)."""
    es = ds.split(SPLIT)
    max_history = int(model.cfg.get("max_history", 50))
    model.eval()  # dropout off, cached rows
    per_user, sizes = [], []
    for s in range(0, len(es.users), batch_size):
        rows = np.arange(s, min(s + batch_size, len(es.users)))
        hist = last_items(es.query, rows, max_history)
        users = es.users[rows]  # the user ids too: a `user_id` model (Gowalla's recipe) reads them
        scores = model.score_all(query_batch(hist, ds.features.user_feats[users].astype(np.int64), users))
        ok = (scores > 0).numpy()
        ok[:, 0] = False
        for j, r in enumerate(rows):
            ok[j, es.query.row(r)] = False
            targets = np.unique(es.targets.row(r))
            sizes.append(ok[j].sum() / ds.n_items)
            if len(targets):
                per_user.append(ok[j, targets].mean())
    return float(np.mean(per_user)), float(np.mean(sizes))


def score(model: nn.Module, ds: Dataset, with_candidates: bool) -> Cell:
    t0 = time.perf_counter()
    summary = evaluate(model, ds, SPLIT, KS).summary
    cell = Cell(summary["recall@20"], summary["recall@50"], n_users=int(summary["n_users"]))
    if with_candidates:
        assert isinstance(model, SparCode)
        cell.cand, cell.set_frac = candidate_recall(model, ds)
    cell.seconds = time.perf_counter() - t0
    return cell


def waterfall(t: Triple, ds: Dataset) -> dict[str, Cell]:
    """Every step of one (dataset, encoder, seed)."""
    ws = warm_start(t.two_tower, t.sparcode, ds)
    sp = one_probe(trained(t.sparcode))  # type: ignore[arg-type]
    assert isinstance(sp, SparCode)
    target = ws.target_density
    models: dict[str, Callable[[], nn.Module]] = {
        "1": lambda: trained(t.two_tower),
        "1a": lambda: DenseSum(ws, quantized=False),
        "2a": lambda: DenseSum(ws, quantized=True),
        "2": lambda: with_density(ws, 1.0),
        "3": lambda: with_density(ws, target),
        "4a": lambda: with_density(sp, 1.0),
        "4": lambda: with_density(sp, float(sp.target_density)),
    }
    if int(t.sparcode.model_cfg("probes", 1)) > 1:
        models["4p"] = lambda: trained(t.sparcode)  # as served: its model.probes
    if t.all_to_all is not None:
        models["5"] = lambda: trained(t.all_to_all)  # type: ignore[union-attr]
    out = {}
    for step in STEPS:
        if step.key in models:
            out[step.key] = score(models[step.key](), ds, step.cut)
            print(
                f"    {step.key:3s} {step.label:45s} R@50 {out[step.key].r50:.4f} ({out[step.key].seconds:.0f} s)"
            )
    return out


@dataclass
class Check:
    triple: Triple
    step: str
    run: Run
    ours: float
    ref: float
    n_ours: int = 0
    n_ref: int = 0

    @property
    def ok(self) -> bool:
        return self.ours == self.ref


def reference(run: Run, sampled: bool) -> tuple[float, int]:
    """(test Recall@20, users) the run itself recorded: its results.json, or on a sampled dataset its reproduce cell
    on the same user sample (training tests every user; the exact retrievers only: flat, sparse, brute force)."""
    if sampled:
        for retriever in ("flat", "sparse", "exact"):
            f = run.path / "cells" / f"test-sample-{retriever}.json"
            if f.exists():
                m = json.loads(f.read_text())["metrics"]
                return float(m["recall@20"]), int(m["n_users"])
        raise SystemExit(f"{run.run_id}: no reproduce cell on the user sample to check against")
    return float(run.results["test"]["recall@20"]), int(run.results["test"]["n_users"])


def sanity(t: Triple, cells: dict[str, Cell], sampled: bool) -> list[Check]:
    """Steps 1, 4 (4p when the run serves with several probes: what it recorded) and 5 against the test Recall@20
    their runs recorded (`reference`; exact equality)."""
    checks = []
    served = "4p" if "4p" in cells else "4"
    for step, run in (("1", t.two_tower), (served, t.sparcode), ("5", t.all_to_all)):
        if run is not None and step in cells:
            ref, n_ref = reference(run, sampled)
            checks.append(Check(t, step, run, cells[step].r20, ref, cells[step].n_users, n_ref))
    return checks


# -- report --------------------------------------------------------------------------------------------------
@dataclass
class DatasetInfo:
    name: str
    data_hash: str
    content_digest: str
    sample: int
    sample_seed: int
    n_eval_users: int
    triples: list[Triple] = field(default_factory=list)
    cells: dict[tuple[str, int], dict[str, Cell]] = field(default_factory=dict)


def fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "—"
    return f"{100 * x:.1f}%" if pct else f"{x:.4f}"


def mean_std(xs: list[float | None], pct: bool = False) -> str:
    vals = [x for x in xs if x is not None]
    if not vals:
        return "—"
    scale, unit, prec = (100.0, "%", 1) if pct else (1.0, "", 4)
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{scale * statistics.mean(vals):.{prec}f} ± {scale * sd:.{prec}f}{unit}"


METRIC_COLS = (
    ("R@20", "r20", False),
    ("R@50", "r50", False),
    ("cand.", "cand", True),
    ("set", "set_frac", True),
)


def dataset_table(info: DatasetInfo) -> list[str]:
    groups: list[tuple[str, list[dict[str, Cell]]]] = []
    encoders = sorted({t.encoder for t in info.triples})
    for enc in encoders:
        seeds = sorted(t.seed for t in info.triples if t.encoder == enc)
        for seed in seeds:
            groups.append((f"{enc} s{seed}", [info.cells[(enc, seed)]]))
        if len(seeds) > 1:
            groups.append((f"{enc} mean ± std ({len(seeds)} seeds)", [info.cells[(enc, s)] for s in seeds]))
    head = ["step"] + [f"{g} {name}" for g, _ in groups for name, _, _ in METRIC_COLS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for step in STEPS:
        row = [f"{step.key} {step.label}" + (" *(diag.)*" if step.diagnostic else "")]
        for _, cells in groups:
            for _, attr, pct in METRIC_COLS:
                xs = [getattr(c[step.key], attr) if step.key in c else None for c in cells]
                row.append(fmt(xs[0], pct) if len(cells) == 1 else mean_std(xs, pct))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def drops(r50: dict[str, float], path: tuple[str, ...]) -> dict[str, float]:
    """R@50 lost from each step of `path` to the next."""
    return {f"{a}→{b}": r50[a] - r50[b] for a, b in zip(path, path[1:], strict=False)}


def biggest_drop(info: DatasetInfo) -> list[str]:
    """Per encoder, the R@50 lost by each main step (mean over seeds), the largest named, and the 1 -> 2 and
    3 -> 4 losses split by the diagnostic steps."""
    out = []
    for enc in sorted({t.encoder for t in info.triples}):
        cells = [info.cells[(t.encoder, t.seed)] for t in info.triples if t.encoder == enc]
        keys = [s.key for s in STEPS if all(s.key in c for c in cells)]
        r50 = {k: statistics.mean(c[k].r50 for c in cells) for k in keys}
        last = "4p" if "4p" in r50 else "4"
        main = drops(r50, ("1", "2", "3", "4", "4p") if last == "4p" else ("1", "2", "3", "4"))
        worst = max(main, key=lambda k: main[k])
        out.append(
            f"- {enc}: R@50 lost per main step: "
            + ", ".join(f"{k} {v:+.4f}" for k, v in main.items())
            + f"; largest: **{worst}**; total 1→{last} {r50['1'] - r50[last]:+.4f}"
            + (f"; all-to-all (5) minus SparCode ({last}) {r50['5'] - r50[last]:+.4f}" if "5" in r50 else "")
        )
        out.append(
            "  - 1→2 split: "
            + ", ".join(f"{k} {v:+.4f}" for k, v in drops(r50, ("1", "1a", "2a", "2")).items())
            + " (token heads, quantization, row standardisation); training: 2→4a (dense) "
            + f"{r50['2'] - r50['4a']:+.4f}, 3→4 (cut) {r50['3'] - r50['4']:+.4f}; trained cut 4a→4 "
            + f"{r50['4a'] - r50['4']:+.4f}"
        )
    return out


def provenance(info: DatasetInfo) -> list[str]:
    lines = [
        f"- processed data: data_hash `{info.data_hash}`, content_digest `{info.content_digest}`",
        f"- evaluated users: {info.n_eval_users} test users"
        + (
            f" (fixed sample of {info.sample}, seed {info.sample_seed}, as the reproduce-full matrix)"
            if info.sample
            else " (all)"
        ),
        "",
        "| encoder | seed | step | run | code_digest | git_commit |",
        "|---|---|---|---|---|---|",
    ]
    for t in info.triples:
        for step, run in (("1", t.two_tower), ("2-4", t.sparcode), ("5", t.all_to_all)):
            if run is not None:
                lines.append(
                    f"| {t.encoder} | {t.seed} | {step} | `{run.path.name}` | `{run.meta.get('code_digest')}` "
                    f"| `{run.meta.get('git_commit')}` |"
                )
    return lines


def write_report(
    out: Path, infos: list[DatasetInfo], checks: list[Check], notes: list[str], command: str, seconds: float
) -> None:
    lines = [
        "# Waterfall: where SparCode loses against the two-tower it starts from",
        "",
        f"Produced by `{command}` in {seconds / 60:.1f} min (1 torch thread).",
        "",
        "Test split, full ranking with every query item masked (`metrics.evaluate`). Steps (the script's "
        "docstring has the details):",
        "",
    ]
    descr = {
        "1": "the two-tower run's best checkpoint",
        "1a": "SparCode's warm start (two-tower encoders, identity + noise token heads, h = 0), its K_u user "
        "tokens *unquantized*, scored sum_k g(z_k, i): all-to-all at step 0",
        "2a": "the warm start with quantized tokens (k-means codebooks of every training user's tokens), "
        "scored sum_k g(ẑ_k, i) without row standardisation",
        "2": "the warm start, quantized, every code row standardised over items, no cut (row density 1.0): "
        "the model's own dense score",
        "3": "the warm start with every code row cut at target_density (5%)",
        "4a": "the trained SparCode checkpoint at row density 1.0 (no cut)",
        "4": "the trained SparCode checkpoint (cut at 5%, exact model scoring), one code per user token",
        "4p": "the same checkpoint as served: each user token reads the rows of its `model.probes` nearest codes "
        "(a beam over the codebooks); absent for runs served with one code per token",
        "5": "the trained all-to-all run (same two-tower warm start and seed), exact",
    }
    lines += [
        f"- **{s.key}** {s.label}: {descr[s.key]}" + (" (diagnostic)" if s.diagnostic else "") for s in STEPS
    ]
    lines += [
        "",
        "Columns per encoder/seed: test Recall@20, Recall@50, candidate recall (steps with a cut: the mean over "
        "test users of the fraction of their targets in the union of their K_u code rows (K_u × P at 4p) after the cut, i.e. "
        "with a positive score, query items masked; an upper bound on Recall at any K) and `set` (the mean "
        "size of that retrievable set, % of the catalogue).",
        "",
    ]
    for info in infos:
        lines += [f"## {info.name}", ""] + dataset_table(info) + [""]
        lines += (
            ["Largest loss of mean R@50 among the main steps 1→2→3→4(→4p):", ""] + biggest_drop(info) + [""]
        )
        lines += provenance(info) + [""]
    lines += [
        "## Sanity checks",
        "",
        "Test Recall@20 of steps 1, 4 (4p where the run serves several probes), 5 vs what the run recorded (exact ==): its results.json, or on a sampled "
        "dataset its reproduce cell on the same users (`cells/test-sample-*.json`).",
        "",
    ]
    lines += ["| dataset | encoder | seed | step | run | here | results.json | users here / there | match |"]
    lines += ["|---|---|---|---|---|---|---|---|---|"]
    for c in checks:
        lines.append(
            f"| {c.triple.dataset} | {c.triple.encoder} | {c.triple.seed} | {c.step} | {c.run.run_id} "
            f"| {c.ours!r} | {c.ref!r} | {c.n_ours} / {c.n_ref} | {'yes' if c.ok else '**NO**'} |"
        )
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


def xlabel(info: DatasetInfo, enc: str) -> str:
    n = sum(t.encoder == enc for t in info.triples)
    users = f", {info.n_eval_users:,}-user sample" if info.sample else ""
    return f"{info.name}\n{enc} ({n} seed{'s' if n > 1 else ''}{users})"


def plot(path: Path, infos: list[DatasetInfo]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(info, enc) for info in infos for enc in sorted({t.encoder for t in info.triples})]
    fig, ax = plt.subplots(figsize=(max(7.0, 2.4 * len(groups)), 5.2))
    width = 0.8 / len(STEPS)
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, len(STEPS)))
    for j, step in enumerate(STEPS):
        means, errs = [], []
        for info, enc in groups:
            vals = [info.cells[(enc, t.seed)][step.key].r50 for t in info.triples
                    if t.encoder == enc and step.key in info.cells[(enc, t.seed)]]  # fmt: skip
            means.append(statistics.mean(vals) if vals else np.nan)
            errs.append(statistics.stdev(vals) if len(vals) > 1 else np.nan)  # no error bar for one seed
        x = np.arange(len(groups)) + (j - (len(STEPS) - 1) / 2) * width
        ax.bar(x, means, width, yerr=errs, color=colors[j], label=f"{step.key} {step.label}",
               hatch="//" if step.diagnostic else None, edgecolor="white", linewidth=0.3, capsize=2)  # fmt: skip
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels([xlabel(info, enc) for info, enc in groups])
    ax.set_ylabel(f"Recall@50 ({SPLIT} split)")
    ax.set_title("SparCode waterfall (mean ± std over seeds; hatched: diagnostics)", fontsize=10)
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# -- main ----------------------------------------------------------------------------------------------------
def check_provenance(t: Triple, info: DatasetInfo, notes: list[str]) -> None:
    """Every run of `t` on the processed data evaluated here (data_hash; content_digest noted if it differs)."""
    for run in (t.two_tower, t.sparcode, t.all_to_all):
        if run is None:
            notes.append(f"{t.dataset} {t.encoder} seed {t.seed}: no all-to-all run, step 5 missing")
            continue
        if run.meta["data_hash"] != info.data_hash:
            raise SystemExit(f"{run.run_id}: data_hash {run.meta['data_hash']} != {info.data_hash}")
        if run.meta.get("content_digest") != info.content_digest:
            notes.append(f"{run.run_id}: content_digest {run.meta.get('content_digest')} != processed data's")


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, action="append", required=True, help="a runs folder (repeatable)")
    ap.add_argument("--out", type=Path, required=True, help="the .md report (the .png goes next to it)")
    ap.add_argument("--seeds", help="comma-separated seeds to keep (default: every seed found)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    command = " ".join(
        [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ]
        + [f"SPARCODE_HOME={os.environ.get('SPARCODE_HOME', '~/.cache/sparcode')}", ".venv/bin/python"]
        + [shlex.quote(a) for a in [sys.argv[0], *argv]]
    )
    spec = tomllib.loads((REPO / "experiments" / "reproduce.toml").read_text())
    samples = dict(spec["reproduce-full"].get("eval_users", {}))  # dataset -> test users scored (a sample)
    sample_seed = int(spec["settings"]["sample_seed"])
    runs, notes = read_runs(args.runs)
    triples = group_runs(runs, notes)
    if args.seeds:
        keep = {int(x) for x in args.seeds.split(",")}
        triples = [t for t in triples if t.seed in keep]
    infos: dict[str, DatasetInfo] = {}
    datasets: dict[str, Dataset] = {}
    checks: list[Check] = []
    for t in triples:
        if t.dataset not in infos:
            data_hash = str(t.sparcode.meta["data_hash"])
            sample = int(samples.get(t.dataset, 0))
            ds, pmeta = load_data(data_hash, sample, sample_seed)
            infos[t.dataset] = DatasetInfo(t.dataset, data_hash, str(pmeta.get("content_digest")), sample,
                                           sample_seed, len(ds.split(SPLIT).users))  # fmt: skip
            datasets[t.dataset] = ds
        info = infos[t.dataset]
        check_provenance(t, info, notes)
        print(f"{t.dataset} {t.encoder} seed {t.seed}: {t.two_tower.run_id} -> {t.sparcode.run_id}")
        cells = waterfall(t, datasets[t.dataset])
        info.triples.append(t)
        info.cells[(t.encoder, t.seed)] = cells
        checks += sanity(t, cells, info.sample > 0)
    seconds = time.perf_counter() - t0
    write_report(args.out, list(infos.values()), checks, notes, command, seconds)
    plot(args.out.with_suffix(".png"), list(infos.values()))
    bad = [c for c in checks if not c.ok]
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {seconds / 60:.1f} min; "
          f"sanity checks {len(checks) - len(bad)}/{len(checks)} exact")  # fmt: skip
    for c in bad:
        print(f"  MISMATCH {c.run.run_id} step {c.step}: {c.ours!r} vs results.json {c.ref!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
