"""Every config key and index / eval option has a declared type and range (config_schema.py).

The cases are generated from the declarations, so a new key or option cannot skip them: just outside each
bound is refused with a UserError naming the key, the boundary inside is accepted, a bad choice or a wrong
type is refused, and every key of every experiments/*.toml is declared.
"""

from __future__ import annotations

import inspect
import shutil
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sparcode_cli.commands.eval import eval_
from sparcode_cli.commands.index import index
from sparcode_cli.config import BASE, available_models, experiments_dir, load_config, run_id
from sparcode_cli.config_schema import (
    MODEL_CONFIGS,
    SECTION_CONFIGS,
    EvalOptions,
    IndexOptions,
    KeySpec,
    Section,
    check_config,
    check_options,
    key_spec,
)
from sparcode_cli.errors import UserError
from tests.cli import exit_code

# Computed with the code before the declarations existed: validation must not move an existing run id.
# (sparcode's moved from sparcode-movielens-f493aaae when model.cut, row_norm, bias_lr and l1 were removed.)
RUN_IDS = {
    "sparcode": "sparcode-movielens-bdf4885d",  # model.probes = 4; af5ee222 with probes 1, 927ad4c9 before distill
    "two-tower": "two-tower-movielens-755bc941",
    "all-to-all": "all-to-all-movielens-b3b3a2da",
    "popularity": "popularity-movielens-84b0d3d2",
}
# Keys set along with a boundary value so that it is checked alone, not against a cross-key rule.
COMPANIONS = {("sparcode", "model.token_dim"): ["model.m=1"]}


def _declared() -> list[tuple[str, str, str, KeySpec]]:
    """(model, section, key, spec) of every declared config key; [data] and [train] once, under two-tower."""
    out = [
        ("two-tower", section, key, key_spec(info))
        for section, schema in SECTION_CONFIGS.items()
        for key, info in schema.model_fields.items()
    ]
    out += [
        (model, "model", key, key_spec(info))
        for model, schema in MODEL_CONFIGS.items()
        for key, info in schema.model_fields.items()
        if key != "name"  # set by --model, not by --set
    ]
    return out


def _around(spec: KeySpec, op: str, bound: float) -> tuple[Any, Any]:
    """(the boundary value inside the bound, the nearest value outside it)."""
    step = 1 if spec.kind is int else 1e-6
    inside, outside = {
        "ge": (bound, bound - step),
        "gt": (bound + step, bound),
        "le": (bound, bound + step),
        "lt": (bound - step, bound),
    }[op]
    return (int(inside), int(outside)) if spec.kind is int else (float(inside), float(outside))


def _literal(value: Any) -> str:
    """A value as the TOML literal `--set` parses."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def _id(*parts: Any) -> str:
    return "-".join(str(p) for p in parts)


DECLARED = _declared()
BOUNDS = [
    (model, f"{section}.{key}", op, *_around(spec, op, bound))
    for model, section, key, spec in DECLARED
    for op, bound in spec.bounds.items()
]
CHOICES = [(model, f"{section}.{key}", spec) for model, section, key, spec in DECLARED if spec.choices]
# a value of another type than the declared one (bool before int: a bool is an int in Python)
WRONG_TYPE: dict[type, list[Any]] = {
    bool: [1, "yes"],
    int: [2.5, "abc", True],
    float: ["abc", True],
    str: [3],
}


# -- every key is declared --------------------------------------------------------------------------------


def test_every_model_with_defaults_has_declarations() -> None:
    assert set(available_models()) == set(MODEL_CONFIGS), (
        "add every experiments/<model>.toml to MODEL_CONFIGS"
    )


@pytest.mark.parametrize("model", available_models())
def test_every_key_of_every_defaults_file_is_declared(model: str) -> None:
    raw = tomllib.loads((experiments_dir() / f"{model}.toml").read_text())
    declared = set(MODEL_CONFIGS[model].model_fields)
    assert not set(raw["model"]) - declared, f"[model] keys of {model}.toml without a declaration"
    assert not declared - set(raw["model"]), f"declared [model] keys without a default in {model}.toml"
    for section, schema in SECTION_CONFIGS.items():
        assert set(BASE[section]) == set(schema.model_fields), f"[{section}] keys of BASE vs declarations"
        assert set(raw.get(section, {})) <= set(schema.model_fields)
    load_config(model)  # the defaults themselves are allowed


def _experiments_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edit: Callable[[str], str]) -> None:
    """experiments/*.toml copied to tmp_path, sparcode.toml edited, and used as the defaults."""
    for path in experiments_dir().glob("*.toml"):
        shutil.copy(path, tmp_path / path.name)
    target = tmp_path / "sparcode.toml"
    target.write_text(edit(target.read_text()))
    monkeypatch.setenv("SPARCODE_EXPERIMENTS", str(tmp_path))


def test_an_undeclared_key_in_a_defaults_file_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _experiments_copy(
        tmp_path, monkeypatch, lambda t: t.replace('name = "sparcode"', 'name = "sparcode"\nknob = 3')
    )
    with pytest.raises(UserError, match=r"model\.knob has no declaration"):
        load_config("sparcode")


def test_a_default_of_the_wrong_type_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _experiments_copy(tmp_path, monkeypatch, lambda t: t.replace("\ndim = 64 ", "\ndim = 64.0 "))
    with pytest.raises(UserError, match=r"model\.dim = 64\.0 is not allowed: must be an integer >= 1"):
        load_config("sparcode")


def test_a_declared_key_without_a_default_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _experiments_copy(tmp_path, monkeypatch, lambda t: t.replace("\nbeta = 0.25 ", "\n# beta = 0.25 "))
    with pytest.raises(UserError, match=r"model\.beta is declared .* but has no default"):
        load_config("sparcode")


# -- bounds, choices, types (generated) --------------------------------------------------------------------


@pytest.mark.parametrize("model, name, op, inside, outside", BOUNDS, ids=[_id(*c[:3]) for c in BOUNDS])
def test_just_outside_a_bound_is_refused(model: str, name: str, op: str, inside: Any, outside: Any) -> None:
    with pytest.raises(UserError) as exc:
        load_config(model, overrides=[f"{name}={_literal(outside)}"])
    assert str(exc.value).startswith(f"{name} = {outside!r} is not allowed: must be ")


@pytest.mark.parametrize("model, name, op, inside, outside", BOUNDS, ids=[_id(*c[:3]) for c in BOUNDS])
def test_the_boundary_inside_is_accepted(model: str, name: str, op: str, inside: Any, outside: Any) -> None:
    cfg = load_config(model, overrides=[*COMPANIONS.get((model, name), []), f"{name}={_literal(inside)}"])
    section, key = name.split(".")
    assert cfg[section][key] == inside


@pytest.mark.parametrize("model, name, spec", CHOICES, ids=[_id(*c[:2]) for c in CHOICES])
def test_choices(model: str, name: str, spec: KeySpec) -> None:
    section, key = name.split(".")
    for choice in spec.choices:
        assert load_config(model, overrides=[f"{name}={choice}"])[section][key] == choice
    with pytest.raises(UserError, match=rf"^{name} = 'bogus' is not one of: {', '.join(spec.choices)}$"):
        load_config(model, overrides=[f"{name}=bogus"])


@pytest.mark.parametrize(
    "model, section, key, spec", DECLARED, ids=[_id(m, f"{s}.{k}") for m, s, k, _ in DECLARED]
)
def test_a_value_of_the_wrong_type_is_refused(model: str, section: str, key: str, spec: KeySpec) -> None:
    for wrong in WRONG_TYPE[spec.kind]:
        if wrong in spec.choices or wrong in spec.also:
            continue
        # through --set (coerced to the default's type first) ...
        with pytest.raises(UserError, match=rf"{section}\.{key}"):
            load_config(model, overrides=[f"{section}.{key}={_literal(wrong)}"])
        # ... and straight against the declaration (strict: what a defaults file could hold)
        cfg = load_config(model)
        cfg[section][key] = wrong
        with pytest.raises(UserError, match=rf"^{section}\.{key} = {wrong!r} is not"):
            check_config(cfg)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_floats_must_be_finite(value: str) -> None:
    with pytest.raises(UserError, match=r"train\.lr = .* must be a finite number > 0"):
        load_config("two-tower", overrides=[f"train.lr={value}"])


def test_device_pattern() -> None:
    assert load_config("two-tower", overrides=["train.device=cuda:1"])["train"]["device"] == "cuda:1"
    with pytest.raises(UserError, match=r"train\.device = 'gpu' is not allowed"):
        load_config("two-tower", overrides=["train.device=gpu"])


def test_nullable_data_keys() -> None:
    cfg = load_config("two-tower", overrides=["data.min_count=0", 'data.rating_threshold="default"'])
    assert cfg["data"]["min_count"] == 0 and cfg["data"]["rating_threshold"] == "default"
    with pytest.raises(UserError, match=r'data\.min_count = -1 is not allowed: .* >= 0 or "default"'):
        load_config("two-tower", overrides=["data.min_count=-1"])


def test_several_bad_keys_give_one_message_listing_each() -> None:
    with pytest.raises(UserError) as exc:
        load_config("sparcode", overrides=["model.k_u=0", "train.lr=-1", "data.max_history=0"])
    lines = str(exc.value).splitlines()
    assert lines[0] == "3 config values are not allowed:"
    assert [line.split(" = ")[0].strip() for line in lines[1:]] == [
        "data.max_history",
        "train.lr",
        "model.k_u",
    ]


# -- cross-key rules -----------------------------------------------------------------------------------------


def test_probes_are_bounded_by_the_code_ids() -> None:
    with pytest.raises(
        UserError, match=r"^model\.probes = 5 is not allowed with model\.n_codewords = 2 and mo"
    ):
        load_config("sparcode", overrides=["model.probes=5", "model.n_codewords=2"])  # 2^2 = 4 code ids
    with pytest.raises(
        UserError, match=r"model\.probes = 65 is not allowed: must be an integer >= 1 and <= 64"
    ):
        load_config("sparcode", overrides=["model.probes=65"])
    assert (
        load_config("sparcode", overrides=["model.probes=4", "model.n_codewords=2"])["model"]["probes"] == 4
    )


def test_token_dim_need_not_be_a_multiple_of_m() -> None:
    """Residual codewords are full tokens (the removed product quantizer cut a token into m equal chunks)."""
    cfg = load_config("sparcode", overrides=["model.token_dim=60", "model.m=3", "model.n_codewords=64"])
    assert (cfg["model"]["token_dim"], cfg["model"]["m"]) == (60, 3)


@pytest.mark.parametrize("model", ["two-tower", "sparcode", "all-to-all"])
def test_sasrec_heads_divide_emb_dim(model: str) -> None:
    bad = ["model.emb_dim=30", "model.sasrec_heads=4"]
    with pytest.raises(UserError, match=r"model\.emb_dim = 30 is not allowed with model\.sasrec_heads = 4"):
        load_config(model, overrides=[*bad, "model.query_encoder=sasrec"])
    load_config(model, overrides=bad)  # the dnn encoder has no heads
    load_config(model, overrides=["model.emb_dim=32", "model.sasrec_heads=4", "model.query_encoder=sasrec"])


def test_code_ids_fit_int64() -> None:
    with pytest.raises(UserError, match=r"model\.n_codewords = 4294967296 with model\.m = 2 is not allowed"):
        load_config("sparcode", overrides=["model.n_codewords=4294967296"])
    load_config("sparcode", overrides=["model.n_codewords=2147483648"])  # 2^62 ids


# -- run ids ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", sorted(RUN_IDS))
def test_run_ids_are_unchanged(model: str) -> None:
    assert run_id(load_config(model), "movielens", "x") == RUN_IDS[model]


def test_a_key_added_later_keeps_the_ids_of_runs_made_before_it() -> None:
    """model.distill at 0 and model.probes at 1, the values before the keys existed, give the ids the defaults
    had then."""
    assert run_id(load_config("sparcode", overrides=["model.probes=1"]), "movielens", "x") == (
        "sparcode-movielens-af5ee222"
    )
    assert run_id(
        load_config("sparcode", overrides=["model.distill=0", "model.probes=1"]), "movielens", "x"
    ) == ("sparcode-movielens-927ad4c9")


# -- the commands ------------------------------------------------------------------------------------------------


def test_cli_train_with_a_bad_value_fails_before_touching_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sparcode_cli.data.preprocess as preprocess

    def untouchable(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the dataset was prepared")

    monkeypatch.setattr(preprocess, "prepare", untouchable)
    out = tmp_path / "runs"
    args = ["train", "--dataset", "movielens", "--model", "sparcode", "--out", str(out), "--no-progress"]
    assert exit_code([*args, "--set", "model.k_u=0"]) == 2
    err = capsys.readouterr().err
    assert "model.k_u = 0 is not allowed: must be an integer >= 1" in err
    assert err.count("model.k_u") == 1 and "Traceback" not in err
    assert not out.exists()


def _cli_defaults(command: Callable[..., Any], schema: type[Section]) -> dict[str, Any]:
    params = inspect.signature(command).parameters
    assert set(schema.model_fields) <= set(params), f"{schema.__name__} declares options the command lacks"
    return {key: params[key].default.default for key in schema.model_fields}


OPTION_SCHEMAS = [(index, IndexOptions), (eval_, EvalOptions)]
OPTION_BOUNDS = [
    (command, schema, key, *_around(spec, op, bound))
    for command, schema in OPTION_SCHEMAS
    for key, info in schema.model_fields.items()
    for spec in [key_spec(info)]
    for op, bound in spec.bounds.items()
]
OPTION_CHOICES = [
    (command, schema, key, key_spec(info))
    for command, schema in OPTION_SCHEMAS
    for key, info in schema.model_fields.items()
    if key_spec(info).choices
]


def _run_command(command: Callable[..., Any], tmp_path: Path, options: list[str]) -> tuple[int, Path]:
    """Runs `sparcode index` / `sparcode eval` on a missing run / index; returns the exit code and the folder
    where output would have gone."""
    out = tmp_path / "out"
    if command is index:
        return exit_code(["index", str(tmp_path / "run"), "--out", str(out), *options]), out
    args = ["eval", "--index", str(out), "--save-topk", str(tmp_path / "topk.parquet"), *options]
    return exit_code(args), out


@pytest.mark.parametrize(
    "command, schema, key, inside, outside",
    OPTION_BOUNDS,
    ids=[_id(c[1].__name__, c[2]) for c in OPTION_BOUNDS],
)
def test_option_bounds(
    command: Callable[..., Any],
    schema: type[Section],
    key: str,
    inside: Any,
    outside: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    flag = "--" + key.replace("_", "-")
    check_options(schema, {**_cli_defaults(command, schema), key: inside})
    code, out = _run_command(command, tmp_path, [f"{flag}={outside}"])
    err = capsys.readouterr().err
    assert code == 2 and f"{flag} = {outside!r} is not allowed: must be " in err, err
    assert "Traceback" not in err and not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "command, schema, key, spec", OPTION_CHOICES, ids=[_id(c[1].__name__, c[2]) for c in OPTION_CHOICES]
)
def test_option_choices(
    command: Callable[..., Any],
    schema: type[Section],
    key: str,
    spec: KeySpec,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    flag = "--" + key.replace("_", "-")
    for choice in spec.choices:
        check_options(schema, {**_cli_defaults(command, schema), key: choice})
    code, out = _run_command(command, tmp_path, [flag, "bogus"])
    err = capsys.readouterr().err
    assert code == 2 and f"{flag} = 'bogus' is not one of: {', '.join(spec.choices)}" in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "command, options, message",
    [
        (index, ["--bias", "nan"], "--bias = nan is not allowed: must be a finite number"),
        (index, ["--nprobe=0", "--ef-search=0"], "2 options are not allowed:\n  --nprobe = 0"),
        (eval_, ["--k", "0,20"], "--k must be positive integers"),
        (eval_, ["--k", "a"], "--k must be a comma-separated list of integers"),
    ],
)
def test_other_bad_options(
    command: Callable[..., Any],
    options: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out = _run_command(command, tmp_path, options)
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []
