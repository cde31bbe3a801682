"""The dataset registry (datasets.toml), name lookup, and `sparcode datasets`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sparcode_cli import paths
from sparcode_cli.commands.app import main
from sparcode_cli.data.download import ensure_raw, human_size, listing
from sparcode_cli.data.registry import get_spec, load_registry, registry_path
from sparcode_cli.errors import UserError
from tests.conftest import REPO

MD5 = re.compile(r"^[0-9a-f]{32}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    return exc.value.code or 0, out.out, " ".join(out.err.split())


def test_project_registry_is_complete_and_consistent() -> None:
    assert registry_path() == REPO / "datasets.toml"
    reg = load_registry()
    expected = {
        "movielens",
        "movielens-100k",
        "movielens-1m",
        "movielens-10m",
        "movielens-20m",
        "movielens-25m",
    }
    assert expected | {"gowalla", "yelp2018", "amazon-book"} <= set(reg)
    seen: dict[str, str] = {}
    for spec in reg.values():
        for key in (spec.name, *spec.aliases):
            assert key.lower() not in seen, f"{key!r} names both {seen[key.lower()]} and {spec.name}"
            seen[key.lower()] = spec.name
        assert spec.files and spec.title and spec.license and spec.format
        hash(spec)  # specs are hashable (usable as cache keys)
        if spec.source == "archive":
            assert spec.url and spec.url.startswith("https://") and spec.url.endswith("/" + spec.archive)
            assert spec.archive_root and MD5.match(spec.archive_md5 or "")
            assert spec.archive_sha256 is None or SHA256.match(spec.archive_sha256)
        elif spec.source == "files":
            for f in spec.files:
                assert f.url and f.url.startswith("https://") and f.url.endswith("/" + f.name)
                assert MD5.match(f.md5 or ""), f"{spec.name}/{f.name} needs an md5"
        else:
            assert spec.source == "embedded" and spec.embedded_path.is_dir()
            assert all(MD5.match(f.md5 or "") for f in spec.files)
        for f in spec.files:
            assert f.md5 is None or MD5.match(f.md5)


def test_shared_data_folder_names_are_aliases() -> None:
    # the shared mirror layout (../shared/data/<folder>/) is found through these names
    assert "ml-100k" in get_spec("movielens-100k").aliases
    assert "gowalla-lightgcn" in get_spec("gowalla").aliases


def test_lookup_by_alias_is_case_insensitive() -> None:
    assert get_spec("ML-100K").name == "movielens-100k"
    assert get_spec("  Gowalla-LightGCN ").name == "gowalla"
    assert get_spec("ml-latest-small").source == "embedded"


def test_unknown_dataset_suggests_the_closest(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UserError) as exc:
        get_spec("movielens-100")
    assert "Did you mean 'movielens-100k'?" in str(exc.value) and "gowalla" in str(exc.value)

    code, _, err = cli(capsys, "download", "movielen-100k")
    assert code == 2
    assert "unknown dataset 'movielen-100k'" in err and "Did you mean 'movielens-100k'?" in err
    assert "Traceback" not in err


def test_registry_override_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = tmp_path / "reg.toml"
    reg.write_text('[mine]\nsource = "files"\nformat = "lightgcn"\n[mine.files]\n"a.txt" = {}\n')
    monkeypatch.setenv("SPARCODE_REGISTRY", str(reg))
    assert list(load_registry()) == ["mine"] and get_spec("mine").title == "mine"

    reg.write_text('[mine]\nsource = "ftp"\n')
    with pytest.raises(UserError, match="source 'ftp'"):
        load_registry()
    reg.write_text("[mine\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_registry()
    reg.write_text("mine = 3\n")
    with pytest.raises(UserError, match="not a \\[table\\]"):
        load_registry()
    monkeypatch.setenv("SPARCODE_REGISTRY", str(tmp_path / "missing.toml"))
    with pytest.raises(UserError, match="cannot read the dataset registry"):
        load_registry()


def test_human_size() -> None:
    assert [human_size(n) for n in (None, 12, 4_924_029, 261_978_986, 3 * 10**12)] == [
        "?",
        "12 B",
        "4.9 MB",
        "262.0 MB",
        "3000.0 GB",
    ]


def test_datasets_command_lists_registry_and_cache_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = cli(capsys, "datasets")
    assert code == 0
    for name in load_registry():
        assert name in out
    assert "grouplens.org" in out and "4.9 MB" in out and "no commercial use" in out
    rows = {r.name: r for r in listing()}
    assert rows["movielens"].cached and rows["movielens"].source == "embedded"
    assert not rows["movielens-100k"].cached and rows["movielens-100k"].source == "archive: grouplens.org"
    assert rows["gowalla"].source == "files: github"
    line = next(ln for ln in out.splitlines() if "movielens-100k" in ln)
    assert line.rstrip().rstrip("│ ").endswith("no")

    # put a verified copy of gowalla-like files into the cache: the row turns to "yes"
    reg = tmp_path / "reg.toml"
    reg.write_text(
        '[tiny]\ntitle = "Tiny"\nsource = "files"\nformat = "lightgcn"\nlicense = "test"\n'
        '[tiny.files]\n"train.txt" = { md5 = "5a105e8b9d40e1329780d62ea2265d8a", url = "https://x.invalid/train.txt" }\n'
    )
    monkeypatch.setenv("SPARCODE_REGISTRY", str(reg))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "train.txt").write_bytes(b"test1")  # md5 5a105e8b9d40e1329780d62ea2265d8a
    assert ensure_raw(get_spec("tiny"), mirror=str(tmp_path / "m"), progress=False).path == paths.raw_dir(
        "tiny"
    )
    code, out, _ = cli(capsys, "datasets")
    assert code == 0
    line = next(ln for ln in out.splitlines() if "tiny" in ln.split())
    assert "yes" in line


def test_help_texts_show_an_example(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    for cmd, example in (
        ("download", "sparcode download movielens-100k --mirror"),
        ("datasets", "sparcode datasets"),
    ):
        code, out, _ = cli(capsys, cmd, "--help")
        assert code == 0 and "Example:" in out and example in out
    code, out, _ = cli(capsys, "download", "--help")
    assert "--mirror" in out and "--force" in out
