"""Expand `experiments/reproduce.toml` into the jobs of one matrix: training runs and evaluated cells.

    plan = expand("reproduce")                                   # the TOML's [reproduce] matrix
    plan = expand("reproduce-full", datasets=["movielens", "gowalla"])
    plan.trains   # TrainSpec: one `sparcode train` run each (model, encoder, interaction, seed, budget, ...)
    plan.evals    # EvalSpec: one evaluated retriever of one run, and the report table it lands in

Pure: nothing is read but the TOML, so the expansion is testable without data. Run ids (config hashes) need
the data hash and are resolved by the runner.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparcode_cli.config import experiments_dir
from sparcode_cli.errors import UserError

MATRICES = ("reproduce", "reproduce-full")
MODELS = ("popularity", "two-tower", "sparcode", "all-to-all")
ENCODED = ("two-tower", "sparcode", "all-to-all")  # models with a query encoder
CROSSED = ("sparcode", "all-to-all")  # models with an interaction network
SWEEPS = ("bias", "codebook", "hnsw")
TABLES = ("main", "main-all", "bias", "codebook", "hnsw")

SETTINGS: dict[str, Any] = {
    "out": "experiments/runs",
    "results": "experiments/results",
    "jobs": 2,
    "train_threads": 1,
    "eval_threads": 2,
    "split": "test",
    "latency_queries": 100,
    "bootstrap_samples": 2000,
    "bootstrap_seed": 0,
    "sample_seed": 0,
}
MATRIX_KEYS = {
    "datasets",
    "models",
    "encoders",
    "interactions",
    "faiss",
    "seeds",
    "warm_start",
    "sweeps",
    "set",
    "model_set",
    "max_steps",
    "dataset_max_steps",
    "dataset_set",
    "eval_users",
    "results",
}
SWEEP_DEFAULTS: dict[str, dict[str, Any]] = {
    "bias": {"density_factors": [4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625]},
    "codebook": {"n_codewords": [16, 64, 256], "k_u": [1, 2, 4, 8], "max_steps": 0, "set": []},
    "hnsw": {"ef_search": [16, 64, 256, 1024]},
}


CODEBOOK_KEYS = ("n_codewords", "k_u", "max_steps", "set")


def codebook_grid(sweep: dict[str, Any], dataset: str) -> dict[str, Any]:
    """[sweep.codebook] with [sweep.codebook.datasets.<dataset>] over it: a dataset whose SparCode recipe has
    another quantizer (Gowalla's one flat codebook) sweeps its own grid."""
    own = dict(sweep.get("datasets", {}).get(dataset, {}))
    unknown = set(own) - set(CODEBOOK_KEYS)
    if unknown:
        raise UserError(
            f"unknown key(s) in [sweep.codebook.datasets.{dataset}]: {', '.join(sorted(unknown))}",
            f"valid: {', '.join(CODEBOOK_KEYS)}",
        )
    return {k: v for k, v in {**sweep, **own}.items() if k != "datasets"}


def dataset_label(name: str) -> str:
    """A registry name as is; a file path by its stem (`data/my.csv` -> `my`), as `sparcode preprocess` names it."""
    p = Path(name)
    if "/" in name or p.suffix.lower() in (".csv", ".tsv", ".parquet", ".pq", ".txt"):
        return p.stem
    return name


@dataclass(frozen=True)
class TrainSpec:
    """One training run. `overrides` is the full `--set` list on top of experiments/<model>.toml."""

    dataset: str
    model: str
    encoder: str | None  # model.query_encoder (None: popularity)
    interaction: str | None  # model.interaction (sparcode, all-to-all)
    seed: int
    overrides: tuple[str, ...]
    init_from: TrainSpec | None = None  # warm start (sparcode, all-to-all: the same-seed two-tower run)
    variant: tuple[tuple[str, Any], ...] = ()  # sweep values, e.g. (("n_codewords", 16), ("k_u", 1))

    @property
    def key(self) -> str:
        """A readable unique name within the plan (the run id is resolved later)."""
        parts = [dataset_label(self.dataset), self.model]
        parts += [p for p in (self.encoder, self.interaction) if p]
        parts += [f"{k}={v}" for k, v in self.variant]
        return "/".join(parts) + f"/seed{self.seed}"

    @property
    def label(self) -> str:
        name = self.model if self.interaction is None else f"{self.model} ({self.interaction})"
        extra = "".join(f", {k}={v}" for k, v in self.variant)
        return name + extra


@dataclass(frozen=True)
class EvalSpec:
    """One evaluated retriever of one run, and where it is reported.

    retriever: "exact" (brute force, evaluation.evaluate_run), "sparse" (SparCode index), "flat" / "hnsw"
    (Faiss over the two-tower item vectors). options: `build_index` keywords (ef_search) or a bias-sweep
    point (density_factor). A dataset with `eval_users` scores every cell on its fixed user sample, and the
    models that can afford it also on all users (table "main-all").
    """

    train: TrainSpec
    table: str  # one of TABLES
    retriever: str
    options: tuple[tuple[str, Any], ...] = ()
    users: str = "all"  # "all" test users, or the dataset's fixed "sample" (matrix eval_users)

    @property
    def key(self) -> str:
        """File-name-safe cache key, unique per run: retriever plus options."""
        return "-".join(
            [self.retriever, *(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in self.options)]
        )


@dataclass
class Plan:
    matrix: str
    settings: dict[str, Any]
    datasets: list[str]
    spec: dict[str, Any]  # the matrix's own section, resolved
    sweeps: dict[str, dict[str, Any]]
    trains: list[TrainSpec] = field(default_factory=list)
    evals: list[EvalSpec] = field(default_factory=list)

    def evals_of(self, table: str, dataset: str | None = None) -> list[EvalSpec]:
        return [e for e in self.evals if e.table == table and (dataset is None or e.train.dataset == dataset)]


def load_toml(path: str | Path | None = None) -> dict[str, Any]:
    p = Path(path) if path is not None else experiments_dir() / "reproduce.toml"
    try:
        with open(p, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(
            f"reproduce config {p} not found", "Run from the repository or pass --config."
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"reproduce config {p} is not valid TOML: {exc}") from None


def _list(spec: dict[str, Any], key: str, where: str) -> list[Any]:
    v = spec.get(key, [])
    if not isinstance(v, list):
        raise UserError(f"{where}.{key} must be a list, got {v!r}")
    return v


def _check(values: list[Any], allowed: tuple[str, ...], what: str) -> None:
    bad = [v for v in values if v not in allowed]
    if bad:
        raise UserError(f"unknown {what}: {', '.join(map(str, bad))}", f"valid: {', '.join(allowed)}")


def expand(
    matrix: str = "reproduce",
    *,
    datasets: list[str] | None = None,
    config: str | Path | None = None,
    raw: dict[str, Any] | None = None,
) -> Plan:
    """The training runs and evaluated cells of `matrix` (see the module docstring)."""
    raw = load_toml(config) if raw is None else raw
    if matrix not in raw:
        known = ", ".join(k for k in raw if k not in ("settings", "sweep")) or "(none)"
        raise UserError(f"no matrix [{matrix}] in the reproduce config", f"matrices: {known}")
    settings = {**SETTINGS, **raw.get("settings", {})}
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise UserError(
            f"unknown [settings] key(s): {', '.join(sorted(unknown))}", f"valid: {', '.join(SETTINGS)}"
        )
    spec = dict(raw[matrix])
    unknown = set(spec) - MATRIX_KEYS
    if unknown:
        raise UserError(
            f"unknown key(s) in [{matrix}]: {', '.join(sorted(unknown))}",
            f"valid: {', '.join(sorted(MATRIX_KEYS))}",
        )
    if (
        "results" in spec
    ):  # a matrix's own results folder (reproduce-full's tables next to, not over, reproduce's)
        settings["results"] = str(spec["results"])
    if datasets:
        spec["datasets"] = list(datasets)
    ds_names = [str(d) for d in _list(spec, "datasets", matrix)]
    if not ds_names:
        raise UserError(f"[{matrix}] lists no datasets", "Set datasets = [...] or pass DATASETS=a,b.")
    models = _list(spec, "models", matrix)
    _check(models, MODELS, "model")
    sweeps_on = _list(spec, "sweeps", matrix)
    _check(sweeps_on, SWEEPS, "sweep")
    encoders = [str(e) for e in _list(spec, "encoders", matrix)] or ["dnn"]
    interactions = [str(i) for i in _list(spec, "interactions", matrix)] or ["mlp"]
    faiss_kinds = [str(f) for f in _list(spec, "faiss", matrix)] or ["flat"]
    _check(faiss_kinds, ("flat", "ivf", "hnsw"), "faiss kind")
    seeds = [int(s) for s in _list(spec, "seeds", matrix)] or [0]
    budgets = {str(k): int(v) for k, v in dict(spec.get("max_steps", {})).items()}
    _check(list(budgets), MODELS, "model in max_steps")
    # per-dataset budgets on top of max_steps, e.g. a bigger catalogue needing more two-tower steps
    ds_budgets: dict[str, dict[str, int]] = {}
    for ds_name, table in dict(spec.get("dataset_max_steps", {})).items():
        if not isinstance(table, dict):
            raise UserError(f"{matrix}.dataset_max_steps.{ds_name} must be a table of model = steps")
        _check(list(table), MODELS, f"model in dataset_max_steps.{ds_name}")
        ds_budgets[str(ds_name)] = {str(k): int(v) for k, v in table.items()}
    spec["dataset_max_steps"] = ds_budgets
    common = [str(s) for s in _list(spec, "set", matrix)]
    model_set = {str(k): [str(x) for x in v] for k, v in dict(spec.get("model_set", {})).items()}
    _check(list(model_set), MODELS, "model in model_set")
    # per-dataset --set lists on top of set and model_set, e.g. one dataset's training recipe
    ds_sets: dict[str, dict[str, list[str]]] = {}
    for ds_name, table in dict(spec.get("dataset_set", {})).items():
        if not isinstance(table, dict) or not all(isinstance(v, list) for v in table.values()):
            raise UserError(f"{matrix}.dataset_set.{ds_name} must be a table of model = [--set values]")
        _check(list(table), MODELS, f"model in dataset_set.{ds_name}")
        ds_sets[str(ds_name)] = {str(k): [str(x) for x in v] for k, v in table.items()}
    spec["dataset_set"] = ds_sets
    warm = bool(spec.get("warm_start", True))
    spec["eval_users"] = {str(k): int(v) for k, v in dict(spec.get("eval_users", {})).items()}
    sweeps = {name: {**SWEEP_DEFAULTS[name], **raw.get("sweep", {}).get(name, {})} for name in SWEEPS}

    plan = Plan(matrix, settings, ds_names, spec, sweeps)
    seen: dict[str, TrainSpec] = {}

    def run(
        dataset: str,
        model: str,
        seed: int,
        encoder: str | None = None,
        interaction: str | None = None,
        init_from: TrainSpec | None = None,
        variant: tuple[tuple[str, Any], ...] = (),
        steps: int | None = None,
        extra: tuple[str, ...] = (),
    ) -> TrainSpec:
        ov = [
            *common,
            *model_set.get(model, []),
            *ds_sets.get(dataset, {}).get(model, []),
            *extra,
            f"train.seed={seed}",
        ]
        budget = steps if steps else {**budgets, **ds_budgets.get(dataset, {})}.get(model, 0)
        if budget and model != "popularity":
            ov.append(f"train.max_steps={budget}")
        if encoder is not None:
            ov.append(f"model.query_encoder={encoder}")
        if interaction is not None:
            ov.append(f"model.interaction={interaction}")
        ov += [f"model.{k}={v}" for k, v in variant]
        t = TrainSpec(dataset, model, encoder, interaction, seed, tuple(ov), init_from, variant)
        # a sweep point with the main config resolves to the main run's run id: the runner trains it once
        if t.key in seen:
            return seen[t.key]
        seen[t.key] = t
        plan.trains.append(t)
        return t

    first_seed = seeds[0]
    for dataset in ds_names:
        sampled = dataset in spec["eval_users"]

        def cell(
            t: TrainSpec,
            table: str,
            retriever: str,
            options: tuple[tuple[str, Any], ...] = (),
            sampled: bool = sampled,
        ) -> None:
            plan.evals.append(EvalSpec(t, table, retriever, options, "sample" if sampled else "all"))
            if sampled and table == "main" and t.model != "all-to-all":
                plan.evals.append(EvalSpec(t, "main-all", retriever, options, "all"))

        tt: dict[tuple[str, int], TrainSpec] = {}
        if "popularity" in models:
            p = run(dataset, "popularity", first_seed)
            cell(p, "main", "exact")
        for enc in encoders:
            for seed in seeds:
                if "two-tower" in models or (warm and ("sparcode" in models or "all-to-all" in models)):
                    t = run(dataset, "two-tower", seed, enc)
                    tt[(enc, seed)] = t
                    if "two-tower" in models:
                        for kind in faiss_kinds:
                            cell(t, "main", kind)
                for inter in interactions:
                    if "sparcode" in models:
                        s = run(dataset, "sparcode", seed, enc, inter, tt.get((enc, seed)) if warm else None)
                        cell(s, "main", "sparse")
                    if "all-to-all" in models:
                        a = run(
                            dataset, "all-to-all", seed, enc, inter, tt.get((enc, seed)) if warm else None
                        )
                        cell(a, "main", "exact")
        enc0, inter0 = encoders[0], interactions[0]
        if "bias" in sweeps_on and "sparcode" in models:
            base = run(
                dataset, "sparcode", first_seed, enc0, inter0, tt.get((enc0, first_seed)) if warm else None
            )
            for f in sweeps["bias"]["density_factors"]:
                cell(base, "bias", "sparse", (("density_factor", float(f)),))
        if "codebook" in sweeps_on and "sparcode" in models:
            grid = codebook_grid(sweeps["codebook"], dataset)
            steps = int(grid.get("max_steps", 0)) or None
            extra = tuple(str(x) for x in grid.get("set", []))
            for n in grid["n_codewords"]:
                for k in grid["k_u"]:
                    s = run(
                        dataset,
                        "sparcode",
                        first_seed,
                        enc0,
                        inter0,
                        tt.get((enc0, first_seed)) if warm else None,
                        (("n_codewords", int(n)), ("k_u", int(k))),
                        steps,
                        extra,
                    )
                    cell(s, "codebook", "sparse")
        if "hnsw" in sweeps_on and ("two-tower" in models):
            t = tt[(enc0, first_seed)]
            for ef in sweeps["hnsw"]["ef_search"]:
                cell(t, "hnsw", "hnsw", (("ef_search", int(ef)),))
    return plan
