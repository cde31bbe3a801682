"""Configs: defaults from experiments/<model>.toml, --config files, --set overrides, unknown keys, hashing."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from sparcode_cli.config import config_hash, load_config, run_id, to_toml
from sparcode_cli.errors import UserError


def test_defaults_two_tower() -> None:
    cfg = load_config("two-tower")
    assert cfg["model"]["name"] == "two-tower"
    assert cfg["model"]["similarity"] == "cosine" and cfg["model"]["temperature"] == pytest.approx(0.1)
    assert cfg["model"]["query_encoder"] == "dnn"
    assert isinstance(cfg["train"]["lr"], float) and isinstance(cfg["train"]["batch_size"], int)
    assert cfg["data"]["split"] == "default"  # the dataset's natural split
    assert set(cfg) == {"data", "model", "train"}


def test_defaults_popularity_and_unknown_model() -> None:
    assert load_config("popularity")["model"]["name"] == "popularity"
    with pytest.raises(UserError, match="unknown model 'nope'") as exc:
        load_config("nope")
    assert "two-tower" in str(exc.value)


def test_set_overrides_and_coercion() -> None:
    cfg = load_config(
        "two-tower",
        overrides=[
            "train.lr=0.003",
            "train.epochs=5.0",  # integral float -> int
            "train.weight_decay=1",  # int -> float
            "model.query_encoder=sasrec",  # bare word -> string
            "batch_size=64",  # unique key: the section may be omitted
            "train.logq=false",
            "data.min_count=10",
            'data.rating_threshold="default"',
        ],
    )
    t = cfg["train"]
    assert t["lr"] == pytest.approx(0.003) and t["epochs"] == 5 and isinstance(t["epochs"], int)
    assert t["weight_decay"] == 1.0 and isinstance(t["weight_decay"], float)
    assert t["batch_size"] == 64 and t["logq"] is False
    assert cfg["model"]["query_encoder"] == "sasrec"
    assert cfg["data"]["min_count"] == 10 and cfg["data"]["rating_threshold"] == "default"


@pytest.mark.parametrize(
    "item, match",
    [
        ("train.epochs=0.5", "must be an integer"),
        ("train.lr=fast", "must be a number"),
        ("train.logq=yes", "must be true or false"),
        ("train.negatives=hard", "not one of"),
        ("model.similarity=l2", "not one of"),
        ("data.min_count=abc", "integer"),
        ("lr", "expected key=value"),
        ("seed=1", "write section.key"),  # seed is in [data] and [train]
    ],
)
def test_bad_values(item: str, match: str) -> None:
    with pytest.raises(UserError, match=match):
        load_config("two-tower", overrides=[item])


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(UserError, match=r"unknown key train\.lrr") as exc:
        load_config("two-tower", overrides=["train.lrr=0.1"])
    assert "batch_size" in str(exc.value) and "lr," in str(exc.value)
    with pytest.raises(UserError, match=r"unknown key model\.dimm") as exc:
        load_config("two-tower", overrides=["model.dimm=3"])
    assert "temperature" in str(exc.value)
    with pytest.raises(UserError, match="unknown section"):
        load_config("two-tower", overrides=["optim.lr=0.1"])


def test_config_file_then_set(tmp_path: Path) -> None:
    f = tmp_path / "my.toml"
    f.write_text('[model]\nname = "two-tower"\ndim = 32\n\n[train]\nlr = 0.01\nepochs = 3\n')
    cfg = load_config(None, f, ["train.lr=0.02"])  # model taken from the file
    assert cfg["model"]["name"] == "two-tower" and cfg["model"]["dim"] == 32
    assert cfg["train"]["lr"] == pytest.approx(0.02) and cfg["train"]["epochs"] == 3
    with pytest.raises(UserError, match="is for model 'two-tower'"):
        load_config("popularity", f)
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlearning_rate = 0.1\n")
    with pytest.raises(UserError, match=r"unknown key train\.learning_rate") as exc:
        load_config("two-tower", bad)
    assert "weight_decay" in str(exc.value)
    top = tmp_path / "top.toml"
    top.write_text('model = "two-tower"\n')
    with pytest.raises(UserError, match="top-level"):
        load_config("two-tower", top)


def test_hash_and_run_id() -> None:
    cfg = load_config("two-tower")
    h = config_hash(cfg, "abc", 0)
    assert len(h) == 8 and h == config_hash(load_config("two-tower"), "abc", 0)
    assert h != config_hash(cfg, "abd", 0) and h != config_hash(cfg, "abc", 1)
    assert h != config_hash(load_config("two-tower", overrides=["train.lr=0.5"]), "abc", 0)
    # thread count and eval batch size do not change results: same run id
    same = load_config("two-tower", overrides=["train.threads=1", "train.eval_batch_size=7"])
    assert config_hash(same, "abc", 0) == h
    assert run_id(cfg, "movielens", "abc").startswith("two-tower-movielens-")


def test_a_newer_key_at_its_old_behaviour_keeps_the_run_id() -> None:
    """model.probes came after runs existed: 1 (the old behaviour) leaves the hash as it was."""
    cfg = load_config("sparcode", overrides=["model.probes=1"])
    old = {s: {k: v for k, v in cfg[s].items() if (s, k) != ("model", "probes")} for s in cfg}
    assert config_hash(cfg, "d", 0) == config_hash(old, "d", 0)
    assert config_hash(load_config("sparcode"), "d", 0) != config_hash(cfg, "d", 0)  # the default, 4


def test_the_quantizer_key_is_residual_only() -> None:
    """The product quantizer lost its ablation and was removed: the key stays (in every run id since session 5)
    with one value, and "product" is refused by name."""
    cfg = load_config("sparcode")
    assert cfg["model"]["quantizer"] == "residual"
    # the key is still in every run id (committed runs are named by it)
    without = {s: {k: v for k, v in cfg[s].items() if (s, k) != ("model", "quantizer")} for s in cfg}
    assert config_hash(cfg, "d", 0) != config_hash(without, "d", 0)
    for value in ("product", "lattice"):
        with pytest.raises(UserError, match=rf"^model\.quantizer = '{value}' is not one of: residual$"):
            load_config("sparcode", overrides=[f"model.quantizer={value}"])


def test_to_toml_round_trip() -> None:
    cfg = load_config("two-tower", overrides=["train.lr=1e-05", 'model.query_encoder="sasrec"'])
    assert tomllib.loads(to_toml(cfg, header="resolved")) == cfg
