"""Experiment configs: TOML under `experiments/<model>.toml`, then a `--config` file, then `--set` overrides.

A resolved config is a dict of three sections:

    [data]   how the dataset is prepared (split, min_count, rating_threshold, max_history, seed)
    [model]  `name` (the registered model) plus flat model keys (dim, emb_dim, hidden, query_encoder, ...)
    [train]  the shared training loop (seed, epochs, batch_size, lr, negatives, patience, ...)

(TOML cannot hold both a top-level `model = "..."` and a `[model]` table, so the name lives in `[model]`.)
The [data] and [train] defaults below apply to every model; a model file may override any of them. Valid
[model] keys are the ones its `experiments/<model>.toml` defines. An unknown key anywhere is an error that
lists the valid keys. `--set section.key=value` parses the value as a TOML literal (a bare word is a string)
and coerces it to the default's type; a key unique across sections may omit the section (`--set lr=0.01`).

The defaults live here and in experiments/*.toml; every key's type, valid range or choices, and the rules
between keys (token_dim a multiple of m, ...) are declared in config_schema.py, and `load_config` checks the
fully resolved config against them before returning it (one UserError naming every bad key).

    cfg = load_config("two-tower", None, ["train.lr=0.003", "model.dim=32"])
    run_id(cfg, "movielens", data_hash)   # "two-tower-movielens-1a2b3c4d"
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import tomllib
from pathlib import Path
from typing import Any

from sparcode_cli.config_schema import check_config
from sparcode_cli.errors import UserError
from sparcode_cli.paths import PACKAGE_DIR

SECTIONS = ("data", "model", "train")

# "default" in a nullable key means: let `sparcode preprocess` pick (None in prepare()).
NULLABLE = {("data", "split"): str, ("data", "min_count"): int, ("data", "rating_threshold"): float}

BASE: dict[str, dict[str, Any]] = {
    "data": {
        "split": "default",  # time | users | given; "default": the dataset's natural split
        "min_count": "default",
        "rating_threshold": "default",
        "max_history": 50,
        "seed": 0,
    },
    "train": {
        "seed": 0,
        "epochs": 20,
        "max_steps": 0,  # 0 = no step budget (epochs decide)
        "batch_size": 512,
        "lr": 0.001,
        "weight_decay": 0.0,
        "negatives": "mixed",
        "n_negatives": 256,
        "logq": True,
        "patience": 3,  # evaluations without a better validation Recall@20 before stopping
        "eval_every_epochs": 1,
        "eval_batch_size": 512,
        "device": "auto",
        "threads": 0,  # 0 = leave torch's default
        "grad_clip": 0.0,  # 0 = off
    },
}

# Keys that do not change what a run computes: left out of the run id, so a resumed run may change them.
NOT_IDENTITY = {("train", "threads"), ("train", "eval_batch_size")}
# Keys added after runs existed, left out of the run id while they hold the value that reproduces the older
# behaviour, so those runs keep their ids (and are reused, not retrained).
IDENTITY_UNLESS_CHANGED = {
    ("model", "gru_layers"): 1,
    ("model", "user_id"): False,
    ("model", "tower"): "mlp",
    ("model", "history"): True,
    ("model", "distill"): 0.0,
    ("model", "probes"): 1,
}


def experiments_dir() -> Path:
    """$SPARCODE_EXPERIMENTS, else the repository's experiments/, else a packaged copy."""
    env = os.environ.get("SPARCODE_EXPERIMENTS")
    if env:
        return Path(env)
    for cand in (PACKAGE_DIR.parent.parent / "experiments", PACKAGE_DIR / "experiments"):
        if cand.is_dir():
            return cand
    return PACKAGE_DIR.parent.parent / "experiments"


def available_models() -> list[str]:
    d = experiments_dir()
    return sorted(p.stem for p in d.glob("*.toml") if p.stem != "reproduce") if d.is_dir() else []


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{what} {path} is not valid TOML: {exc}") from None


def defaults(model: str) -> dict[str, Any]:
    """The built-in defaults of one model: BASE under experiments/<model>.toml."""
    path = experiments_dir() / f"{model}.toml"
    if not path.is_file():
        known = ", ".join(available_models()) or "(none)"
        raise UserError(f"unknown model {model!r}: no defaults file {path}", hint=f"models: {known}")
    raw = _read_toml(path, "model defaults")
    cfg = copy.deepcopy(BASE)
    cfg["model"] = {"name": model}
    _check_sections(raw, path)
    for section in ("data", "train"):
        for key, value in raw.get(section, {}).items():
            if key not in cfg[section]:
                raise UserError(
                    f"unknown key {section}.{key} in {path}",
                    hint=f"valid keys in section {section}: {_keys(cfg[section])}",
                )
            cfg[section][key] = _coerce(section, key, value, cfg[section][key], str(path))
    for key, value in raw.get("model", {}).items():
        cfg["model"][key] = value
    if cfg["model"]["name"] != model:
        raise UserError(f"{path} sets model.name = {cfg['model']['name']!r}, expected {model!r}")
    return cfg


def load_config(
    model: str | None = None,
    config_file: str | os.PathLike[str] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Resolve a config: defaults of `model`, then `config_file`, then `--set` overrides.

    `model=None` takes the model from the config file's `model.name`, else "sparcode".
    """
    user: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        user = _read_toml(path, "config file")
        _check_sections(user, path)
        file_model = user.get("model", {}).get("name")
        if model is None:
            model = file_model
        elif file_model is not None and file_model != model:
            raise UserError(
                f"config file {path} is for model {file_model!r} but --model is {model!r}",
                hint="drop one of them or make them agree",
            )
    model = model or "sparcode"
    cfg = defaults(model)
    for section, values in user.items():
        for key, value in values.items():
            _set(cfg, section, key, value, f"config file {config_file}")
    for item in overrides:
        section, key, value = _parse_override(cfg, item)
        _set(cfg, section, key, value, f"--set {item}")
    check_config(cfg)
    return cfg


def _check_sections(raw: dict[str, Any], path: Path) -> None:
    for key, value in raw.items():
        if key not in SECTIONS or not isinstance(value, dict):
            raise UserError(
                f"unknown top-level key {key!r} in {path}",
                hint=f"a config has only the sections {', '.join(SECTIONS)} (tables)",
            )


def _keys(section: dict[str, Any]) -> str:
    return ", ".join(sorted(section))


def _set(cfg: dict[str, Any], section: str, key: str, value: Any, where: str) -> None:
    if section not in cfg:
        raise UserError(f"unknown section {section!r} in {where}", hint=f"sections: {', '.join(SECTIONS)}")
    if key not in cfg[section]:
        raise UserError(
            f"unknown key {section}.{key} in {where}",
            hint=f"valid keys in section {section}: {_keys(cfg[section])}",
        )
    if section == "model" and key == "name":
        if value != cfg["model"]["name"]:
            raise UserError(f"{where}: model.name cannot be changed here; use --model {value}")
        return
    cfg[section][key] = _coerce(section, key, value, cfg[section][key], where)


def _parse_override(cfg: dict[str, Any], item: str) -> tuple[str, str, Any]:
    if "=" not in item:
        raise UserError(f"bad --set {item!r}: expected key=value, e.g. --set train.lr=0.001")
    name, text = item.split("=", 1)
    name, text = name.strip(), text.strip()
    if "." in name:
        section, key = name.split(".", 1)
    else:
        owners = [s for s in SECTIONS if name in cfg[s]]
        if len(owners) != 1:
            where = f"several sections ({', '.join(owners)})" if owners else "no section"
            raise UserError(
                f"--set {item}: key {name!r} is in {where}; write section.key",
                hint="; ".join(f"section {s}: {_keys(cfg[s])}" for s in SECTIONS),
            )
        section, key = owners[0], name
    return section, key, parse_value(text)


def parse_value(text: str) -> Any:
    """A TOML literal (`0.01`, `true`, `"x"`, `[1, 2]`); anything else is the string itself."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _coerce(section: str, key: str, value: Any, default: Any, where: str) -> Any:
    name = f"{section}.{key}"

    def bad(expected: str) -> UserError:
        return UserError(f"{where}: {name} must be {expected}, got {value!r}")

    nullable = NULLABLE.get((section, key))
    if nullable is not None:
        if value in ("default", None):
            return "default"
        default = nullable(0)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if isinstance(default, int):
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad("an integer" + (' or "default"' if nullable else ""))
    if isinstance(default, float):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise bad("a number" + (' or "default"' if nullable else ""))
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise bad("a string")
    if isinstance(default, list):
        if isinstance(value, list):
            return value
        raise bad("a list")
    return value


def nullable(value: Any) -> Any:
    """The value prepare() takes for a nullable key ("default" -> None)."""
    return None if value == "default" else value


# -- identity --------------------------------------------------------------------------------------------


def config_hash(cfg: dict[str, Any], data_hash: str, seed: int) -> str:
    """hash8 of the resolved config (minus keys that do not change results), the data hash and the seed."""
    ident = {
        s: {
            k: v
            for k, v in cfg[s].items()
            if (s, k) not in NOT_IDENTITY and IDENTITY_UNLESS_CHANGED.get((s, k), object()) != v
        }
        for s in cfg
    }
    blob = json.dumps({"config": ident, "data": data_hash, "seed": int(seed)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def run_id(cfg: dict[str, Any], dataset: str, data_hash: str) -> str:
    """`<model>-<dataset>-<hash8>`."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in dataset) or "data"
    return f"{cfg['model']['name']}-{safe}-{config_hash(cfg, data_hash, cfg['train']['seed'])}"


# -- writing ---------------------------------------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(cfg: dict[str, Any], header: str = "") -> str:
    """A resolved config as TOML (sections of scalars and lists; what load_config reads back)."""
    lines = [f"# {line}" for line in header.splitlines()]
    for section in [s for s in SECTIONS if s in cfg] + [s for s in cfg if s not in SECTIONS]:
        if lines:
            lines.append("")
        lines.append(f"[{section}]")
        for key, value in cfg[section].items():
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
