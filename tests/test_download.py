"""`sparcode download`: offline tests against a local HTTP server and local mirror folders."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import stat
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sparcode_cli import paths
from sparcode_cli.commands.app import main
from sparcode_cli.data import download as dl
from sparcode_cli.data.download import MARKER, RawData, cached_raw, ensure_raw
from sparcode_cli.data.registry import DatasetSpec, FileSpec, get_spec, load_registry
from sparcode_cli.errors import UserError
from tests.conftest import SHARED_DATA
from tests.http_range_server import RangeServer

NAME = "tiny-test"
ROOT = "tiny-root"
ARCHIVE = "tiny.zip"
FILES = {
    "ratings.dat": b"".join(
        b"%d::%d::%d::%d\n" % (u, i, (u + i) % 5 + 1, 1000 + u * i) for u in range(60) for i in range(7)
    ),
    "movies.dat": b"1::Toy Story (1995)::Animation\n2::Heat (1995)::Action\n",
}
EXTRA = {"README": b"not needed, extracted anyway\n", "sub/notes.txt": b"nested member\n"}


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def make_zip(members: dict[str, bytes], root: str | None = ROOT) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        if root:
            zf.writestr(zipfile.ZipInfo(f"{root}/"), b"")
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(f"{root}/{name}" if root else name), data)
    return buf.getvalue()


GOOD_ZIP = make_zip({**FILES, **EXTRA})


def archive_spec(url: str | None, archive: bytes = GOOD_ZIP, md5s: bool = True, **kw: object) -> DatasetSpec:
    fields: dict[str, object] = dict(
        name=NAME,
        title="Tiny test set",
        source="archive",
        format="ml-1m",
        files=tuple(FileSpec(n, md5(d) if md5s else None) for n, d in FILES.items()),
        aliases=("tiny", "tiny-alias"),
        url=url,
        archive=ARCHIVE,
        archive_root=ROOT,
        archive_md5=md5(archive),
        archive_sha256=hashlib.sha256(archive).hexdigest(),
        size_bytes=len(archive),
    )
    fields.update(kw)
    return DatasetSpec(**fields)  # type: ignore[arg-type]


def files_spec(urls: dict[str, str | None]) -> DatasetSpec:
    return DatasetSpec(
        name="tinyfiles",
        title="Tiny plain files",
        source="files",
        format="lightgcn",
        files=tuple(FileSpec(n, md5(FILES[n]), u) for n, u in urls.items()),
        aliases=("tinyfiles-lightgcn",),
    )


def write_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, archive: bytes = GOOD_ZIP
) -> Path:
    files = "\n".join(f'"{n}" = {{ md5 = "{md5(d)}" }}' for n, d in FILES.items())
    text = f"""
[{NAME}]
title = "Tiny test set"
aliases = ["tiny"]
source = "archive"
format = "ml-1m"
url = "{url}"
archive = "{ARCHIVE}"
archive_root = "{ROOT}"
archive_md5 = "{md5(archive)}"
size_bytes = {len(archive)}

[{NAME}.files]
{files}
"""
    reg = tmp_path / "datasets.toml"
    reg.write_text(text, encoding="utf-8")
    monkeypatch.setenv("SPARCODE_REGISTRY", str(reg))
    return reg


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    return exc.value.code or 0, " ".join(out.out.split()), " ".join(out.err.split())


def nospace(text: str) -> str:
    return "".join(text.split())


def assert_good_raw(raw: RawData, source: str) -> None:
    assert raw.source == source
    assert raw.path == paths.raw_dir(NAME)
    assert raw.checksums == {n: md5(d) for n, d in FILES.items()}
    for n, d in FILES.items():
        assert (
            raw.path / n
        ).read_bytes() == d  # flattened: raw/<name>/ratings.dat, not raw/<name>/tiny-root/...
    marker = json.loads((raw.path / MARKER).read_text())
    assert {n: v["md5"] for n, v in marker["files"].items()} == raw.checksums
    leftovers = [p.name for p in raw.path.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"temporary folders left beside the raw folder: {leftovers}"
    assert not list(paths.downloads_dir().glob("**/*.partial")) if paths.downloads_dir().exists() else True


def nothing_cached(name: str = NAME) -> bool:
    raw_root = paths.raw_dir(name).parent
    return not paths.raw_dir(name).exists() and (not raw_root.exists() or not any(raw_root.iterdir()))


@pytest.fixture
def server() -> Iterator[RangeServer]:
    with RangeServer() as srv:
        yield srv


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    monkeypatch.setenv("SPARCODE_RETRIES", "2")
    monkeypatch.setenv("SPARCODE_BACKOFF", "0.01")
    monkeypatch.setenv("SPARCODE_TIMEOUT", "5")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    sleeps: list[float] = []
    monkeypatch.setattr(dl.time, "sleep", sleeps.append)
    return sleeps


# ----------------------------------------------------------------------------------------- HTTP: archives


def test_download_extracts_flattened_and_verifies(server: RangeServer) -> None:
    url = server.add(ARCHIVE, GOOD_ZIP)
    spec = archive_spec(url)
    assert cached_raw(spec) is None

    raw = ensure_raw(spec, progress=False)

    assert_good_raw(raw, "download")
    assert (raw.path / "README").read_bytes() == EXTRA["README"]  # every member of archive_root/ is extracted
    assert (raw.path / "sub" / "notes.txt").read_bytes() == EXTRA["sub/notes.txt"]
    assert (paths.downloads_dir() / ARCHIVE).read_bytes() == GOOD_ZIP  # the verified archive is kept
    assert server.log == [server.log[0]] and server.log[0].status == 200
    assert server.log[0].range is None
    hit = cached_raw(spec)
    assert hit is not None and hit.source == "cache" and hit.checksums == raw.checksums


def test_cli_download_then_already_cached_makes_no_request(
    server: RangeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_registry(tmp_path, monkeypatch, server.add(ARCHIVE, GOOD_ZIP))
    code, out, _ = cli(capsys, "download", "tiny")
    assert code == 0, out
    assert "downloaded" in out and "2 files verified" in out
    assert len(server.log) == 1

    server.log.clear()
    code, out, _ = cli(capsys, "download", NAME)
    assert code == 0
    assert "already cached and verified" in out and "--force" in out
    assert server.log == []  # no network at all

    code, out, _ = cli(capsys, "download", NAME, "--force")
    assert code == 0 and "downloaded" in out
    assert server.statuses() == [200]


def test_cli_checksum_mismatch_exits_2_and_removes_the_file(
    server: RangeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_registry(tmp_path, monkeypatch, server.add(ARCHIVE, GOOD_ZIP))
    server.corrupt = True
    code, _, err = cli(capsys, "download", NAME)
    assert code == 2
    assert "checksum mismatch" in err and f"expected md5 {md5(GOOD_ZIP)}" in err and "got" in err
    assert "Traceback" not in err
    assert not (paths.downloads_dir() / ARCHIVE).exists()
    assert not (paths.downloads_dir() / f"{ARCHIVE}.partial").exists()
    assert nothing_cached()


def test_resumes_a_partial_file_with_a_range_request(server: RangeServer) -> None:
    spec = archive_spec(server.add(ARCHIVE, GOOD_ZIP))
    half = len(GOOD_ZIP) // 2
    paths.downloads_dir().mkdir(parents=True)
    (paths.downloads_dir() / f"{ARCHIVE}.partial").write_bytes(GOOD_ZIP[:half])

    raw = ensure_raw(spec, progress=False)

    assert server.ranges() == [f"bytes={half}-"]
    assert server.statuses() == [206]
    assert_good_raw(raw, "download")
    assert (paths.downloads_dir() / ARCHIVE).read_bytes() == GOOD_ZIP


def test_server_ignoring_range_makes_the_client_start_over(server: RangeServer) -> None:
    spec = archive_spec(server.add(ARCHIVE, GOOD_ZIP))
    half = len(GOOD_ZIP) // 2
    paths.downloads_dir().mkdir(parents=True)
    (paths.downloads_dir() / f"{ARCHIVE}.partial").write_bytes(GOOD_ZIP[:half])
    server.ignore_range = True

    raw = ensure_raw(spec, progress=False)

    # one request: the client asked for a range, got 200 + the whole body, truncated instead of appending
    assert server.ranges() == [f"bytes={half}-"]
    assert server.statuses() == [200]
    assert_good_raw(raw, "download")
    assert (paths.downloads_dir() / ARCHIVE).read_bytes() == GOOD_ZIP


def test_stale_partial_that_does_not_verify_is_fetched_again_from_zero(server: RangeServer) -> None:
    spec = archive_spec(server.add(ARCHIVE, GOOD_ZIP))
    paths.downloads_dir().mkdir(parents=True)
    (paths.downloads_dir() / f"{ARCHIVE}.partial").write_bytes(b"x" * 100)  # left over from another file
    raw = ensure_raw(spec, progress=False)
    assert server.ranges() == ["bytes=100-", None]
    assert server.statuses() == [206, 200]
    assert_good_raw(raw, "download")


def test_dropped_connection_is_retried_and_resumed(server: RangeServer, _fast_retries: list[float]) -> None:
    big = make_zip({**FILES, "blob.bin": os.urandom(600_000)})  # several 64 KiB chunks arrive before the drop
    spec = archive_spec(server.add(ARCHIVE, big), archive=big)
    server.drop_next = 1
    raw = ensure_raw(spec, progress=False)
    assert server.statuses() == [200, 206]
    first, second = server.ranges()
    offset = int(second.removeprefix("bytes=").removesuffix("-"))  # type: ignore[union-attr]
    assert first is None and 0 < offset <= len(big) // 2
    assert _fast_retries == [0.01]
    assert_good_raw(raw, "download")
    assert (paths.downloads_dir() / ARCHIVE).read_bytes() == big


def test_retries_with_exponential_backoff_after_transient_failures(
    server: RangeServer, _fast_retries: list[float]
) -> None:
    spec = archive_spec(server.add(ARCHIVE, GOOD_ZIP))
    server.fail_next = 2
    raw = ensure_raw(spec, progress=False)
    assert server.statuses() == [503, 503, 200]
    assert _fast_retries == [0.01, 0.02]
    assert_good_raw(raw, "download")


def test_gives_up_after_the_last_retry(server: RangeServer, _fast_retries: list[float]) -> None:
    spec = archive_spec(server.add(ARCHIVE, GOOD_ZIP))
    server.fail_next = 99
    with pytest.raises(UserError) as exc:
        ensure_raw(spec, progress=False)
    text = str(exc.value)
    assert "HTTP 503" in text and "after 3 attempts" in text and "--mirror" in text
    assert server.statuses() == [503, 503, 503]
    assert _fast_retries == [0.01, 0.02]
    assert nothing_cached()


def test_cli_unreachable_host_mentions_mirror(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    write_registry(tmp_path, monkeypatch, f"http://127.0.0.1:{port}/{ARCHIVE}")
    code, _, err = cli(capsys, "download", NAME)
    assert code == 2
    assert f"could not download {ARCHIVE} from 127.0.0.1:{port}" in err
    assert "--mirror URL|DIR" in err and "SPARCODE_MIRROR" in err
    assert "Traceback" not in err
    assert nothing_cached()


def test_404_is_not_retried_and_names_the_url(server: RangeServer, _fast_retries: list[float]) -> None:
    spec = archive_spec(f"{server.url}/nowhere/{ARCHIVE}")
    with pytest.raises(UserError) as exc:
        ensure_raw(spec, progress=False)
    assert "HTTP 404" in str(exc.value) and "/nowhere/" in str(exc.value) and "--mirror" in str(exc.value)
    assert server.statuses() == [404] and _fast_retries == []


@pytest.mark.parametrize("evil", ["../evil", "/abs/evil", f"{ROOT}/../../evil", "C:/evil", "..\\evil"])
def test_archive_member_escaping_the_folder_is_refused_before_extracting(
    server: RangeServer, tmp_path: Path, evil: str
) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for n, d in FILES.items():  # good members first: nothing at all may be extracted
            zf.writestr(f"{ROOT}/{n}", d)
        zf.writestr(zipfile.ZipInfo(evil), b"pwned")
    bad_zip = buf.getvalue()
    assert evil in zipfile.ZipFile(io.BytesIO(bad_zip)).namelist()
    spec = archive_spec(server.add(ARCHIVE, bad_zip), archive=bad_zip)

    with pytest.raises(UserError) as exc:
        ensure_raw(spec, progress=False)

    assert "outside the target folder" in str(exc.value) and repr(evil) in str(exc.value)
    assert nothing_cached()
    assert not (paths.downloads_dir() / ARCHIVE).exists()  # the bad archive is not kept
    home = paths.sparcode_home()
    assert [p for p in home.rglob("*") if "evil" in p.name] == []
    assert not Path("/abs/evil").exists()


def test_archive_lacking_a_needed_file_is_refused(server: RangeServer) -> None:
    partial_zip = make_zip({"movies.dat": FILES["movies.dat"]})
    spec = archive_spec(server.add(ARCHIVE, partial_zip), archive=partial_zip)
    with pytest.raises(UserError, match="lacks ratings.dat"):
        ensure_raw(spec, progress=False)
    assert nothing_cached()


def test_inner_file_checksum_mismatch_is_refused(server: RangeServer) -> None:
    other = make_zip({**FILES, "ratings.dat": FILES["ratings.dat"] + b"1::1::1::1\n"})
    spec = archive_spec(server.add(ARCHIVE, other), archive=other)
    with pytest.raises(
        UserError, match=f"checksum mismatch for ratings.dat .*expected md5 {md5(FILES['ratings.dat'])}"
    ):
        ensure_raw(spec, progress=False)
    assert nothing_cached()


def test_lost_raw_folder_is_restored_from_the_kept_archive(server: RangeServer) -> None:
    spec = archive_spec(server.add(ARCHIVE, GOOD_ZIP))
    ensure_raw(spec, progress=False)
    shutil.rmtree(paths.raw_dir(NAME))
    server.log.clear()
    raw = ensure_raw(spec, progress=False)
    assert raw.source == "cache" and server.log == []
    assert_good_raw(raw, "cache")


# --------------------------------------------------------------------------------------------- the cache


def test_cached_raw_needs_the_completion_marker_and_intact_files(server: RangeServer) -> None:
    spec = archive_spec(server.add(ARCHIVE, GOOD_ZIP))
    raw = ensure_raw(spec, progress=False)
    marker = raw.path / MARKER

    # same size, one byte changed (mtime moves): re-hashed and refused
    data = bytearray(FILES["ratings.dat"])
    data[0] ^= 1
    (raw.path / "ratings.dat").write_bytes(bytes(data))
    assert cached_raw(spec) is None
    (raw.path / "ratings.dat").write_bytes(FILES["ratings.dat"])  # restored: mtime differs, hash agrees
    assert cached_raw(spec) is not None

    # a registry whose checksum changed no longer accepts this copy
    assert cached_raw(archive_spec(spec.url, archive_md5="0" * 32)) is None

    # a folder without the marker (e.g. half-extracted) is not a cache hit, and gets rebuilt
    marker.unlink()
    assert cached_raw(spec) is None
    server.log.clear()
    raw2 = ensure_raw(spec, progress=False)
    assert raw2.source == "cache" and server.log == []  # re-extracted from the kept archive
    assert marker.is_file()


def test_force_refetches(server: RangeServer) -> None:
    spec = archive_spec(server.add(ARCHIVE, GOOD_ZIP))
    ensure_raw(spec, progress=False)
    assert ensure_raw(spec, progress=False).source == "cache"
    raw = ensure_raw(spec, force=True, progress=False)
    assert raw.source == "download" and server.statuses() == [200, 200]
    assert_good_raw(raw, "download")


# -------------------------------------------------------------------------------------------- HTTP mirror


def test_http_mirror_tries_base_then_dataset_subfolder(
    server: RangeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.add(f"tiny-alias/{ARCHIVE}", GOOD_ZIP)
    spec = archive_spec("http://unreachable.invalid/x.zip")
    monkeypatch.setenv("SPARCODE_MIRROR", server.url + "/")
    raw = ensure_raw(spec, progress=False)
    assert raw.source == "mirror"
    assert server.statuses()[-1] == 200 and server.log[-1].path == f"/tiny-alias/{ARCHIVE}"
    assert server.log[0].path == f"/{ARCHIVE}" and server.statuses()[0] == 404
    assert_good_raw(raw, "mirror")


# ---------------------------------------------------------------------------------------- local mirrors


@pytest.mark.parametrize("sub", ["", "tiny-alias", ROOT, "some-other-name"])
def test_local_mirror_holding_extracted_files(tmp_path: Path, sub: str) -> None:
    mirror = tmp_path / "mirror"
    folder = mirror / sub if sub else mirror
    folder.mkdir(parents=True)
    for n, d in FILES.items():
        (folder / n).write_bytes(d)
        (folder / n).chmod(stat.S_IRUSR)  # the mirror may be read-only
    (mirror / "unrelated").mkdir()
    spec = archive_spec(None)

    raw = ensure_raw(spec, mirror=str(mirror), progress=False)

    assert_good_raw(raw, "mirror")
    assert sorted(p.name for p in raw.path.iterdir()) == sorted([*FILES, MARKER])  # only verified files
    assert os.stat(raw.path / "ratings.dat").st_mode & stat.S_IWUSR  # copied, not linked
    assert (folder / "ratings.dat").read_bytes() == FILES["ratings.dat"]


@pytest.mark.parametrize("sub", ["", "tiny", NAME])
def test_local_mirror_holding_the_archive(tmp_path: Path, sub: str) -> None:
    folder = tmp_path / "mirror" / sub
    folder.mkdir(parents=True)
    (folder / ARCHIVE).write_bytes(GOOD_ZIP)
    raw = ensure_raw(archive_spec(None), mirror=str(tmp_path / "mirror"), progress=False)
    assert_good_raw(raw, "mirror")
    assert (raw.path / "README").is_file()  # extracted from the archive, not copied file by file
    assert (paths.downloads_dir() / ARCHIVE).read_bytes() == GOOD_ZIP


def test_local_mirror_archive_file_path_and_file_url(tmp_path: Path) -> None:
    (tmp_path / ARCHIVE).write_bytes(GOOD_ZIP)
    assert_good_raw(ensure_raw(archive_spec(None), mirror=str(tmp_path / ARCHIVE), progress=False), "mirror")
    raw = ensure_raw(archive_spec(None), mirror=(tmp_path.as_uri()), force=True, progress=False)
    assert_good_raw(raw, "mirror")


def test_cli_local_mirror_without_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_registry(tmp_path, monkeypatch, "http://unreachable.invalid/tiny.zip")
    mirror = tmp_path / "empty-mirror"
    (mirror / "tiny").mkdir(parents=True)
    (mirror / "tiny" / "movies.dat").write_bytes(FILES["movies.dat"])  # one of two: not enough
    code, _, err = cli(capsys, "download", NAME, "--mirror", str(mirror))
    assert code == 2
    assert "holds no copy of tiny-test" in err
    assert ARCHIVE in err and "ratings.dat" in err and "movies.dat" in err
    assert nospace(str(mirror / "tiny")) in nospace(err)
    assert nothing_cached()

    code, _, err = cli(capsys, "download", NAME, "--mirror", str(tmp_path / "nope"))
    assert code == 2 and "does not exist" in err


def test_local_mirror_with_a_damaged_file_is_refused(tmp_path: Path) -> None:
    for n, d in FILES.items():
        (tmp_path / n).write_bytes(d if n != "ratings.dat" else b"9" + d[1:])
    with pytest.raises(UserError) as exc:
        ensure_raw(archive_spec(None), mirror=str(tmp_path), progress=False)
    assert "checksum mismatch for ratings.dat" in str(exc.value) and md5(FILES["ratings.dat"]) in str(
        exc.value
    )
    assert nothing_cached()


def test_local_mirror_with_a_damaged_archive_is_refused(tmp_path: Path) -> None:
    (tmp_path / ARCHIVE).write_bytes(GOOD_ZIP[:100] + bytes([GOOD_ZIP[100] ^ 1]) + GOOD_ZIP[101:])
    with pytest.raises(UserError, match="checksum mismatch for tiny.zip"):
        ensure_raw(archive_spec(None), mirror=str(tmp_path), progress=False)
    assert nothing_cached()
    assert not paths.downloads_dir().exists() or list(paths.downloads_dir().iterdir()) == []


def test_extracted_copy_without_recorded_md5s_needs_the_archive(tmp_path: Path) -> None:
    for n, d in FILES.items():
        (tmp_path / n).write_bytes(d)
    spec = archive_spec(None, md5s=False)
    with pytest.raises(UserError) as exc:
        ensure_raw(spec, mirror=str(tmp_path), progress=False)
    assert "cannot be verified" in str(exc.value) and f"archive {ARCHIVE}" in str(exc.value)
    assert nothing_cached()

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / ARCHIVE).write_bytes(GOOD_ZIP)  # with the archive beside them, it works
    raw = ensure_raw(spec, mirror=str(tmp_path), progress=False)
    assert raw.source == "mirror" and raw.checksums == {n: md5(d) for n, d in FILES.items()}


# ----------------------------------------------------------------------------------- source = "files"


def test_plain_files_over_http(server: RangeServer) -> None:
    urls = {n: server.add(f"data/{n}", d) for n, d in FILES.items()}
    spec = files_spec(urls)  # type: ignore[arg-type]
    raw = ensure_raw(spec, progress=False)
    assert raw.source == "download" and raw.path == paths.raw_dir("tinyfiles")
    assert raw.checksums == {n: md5(d) for n, d in FILES.items()}
    assert cached_raw(spec) is not None
    assert not (paths.downloads_dir() / "tinyfiles").exists()


def test_plain_files_checksum_mismatch(server: RangeServer) -> None:
    urls = {n: server.add(f"data/{n}", d) for n, d in FILES.items()}
    server.corrupt = True
    with pytest.raises(UserError, match="checksum mismatch for ratings.dat"):
        ensure_raw(files_spec(urls), progress=False)  # type: ignore[arg-type]
    assert nothing_cached("tinyfiles")
    assert list((paths.downloads_dir() / "tinyfiles").glob("*")) == []


def test_plain_files_from_a_local_mirror_subfolder(tmp_path: Path) -> None:
    folder = tmp_path / "tinyfiles-lightgcn"
    folder.mkdir()
    for n, d in FILES.items():
        (folder / n).write_bytes(d)
    raw = ensure_raw(files_spec(dict.fromkeys(FILES)), mirror=str(tmp_path), progress=False)
    assert raw.source == "mirror" and raw.checksums == {n: md5(d) for n, d in FILES.items()}


# ------------------------------------------------------------------------------- embedded and real data


def test_embedded_movielens_verifies_offline(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import requests

    def no_network(*a: object, **k: object) -> None:
        raise AssertionError("the embedded dataset must not touch the network")

    monkeypatch.setattr(requests.Session, "request", no_network)
    spec = get_spec("movielens")
    raw = ensure_raw(spec, mirror="http://127.0.0.1:9/", force=True, progress=False)
    assert raw.source == "embedded"
    assert raw.path == paths.EMBEDDED_DIR / "ml-latest-small"
    assert raw.checksums == {f.name: f.md5 for f in spec.files}
    assert cached_raw(spec) == raw
    assert not paths.raw_dir("movielens").exists()  # never copied

    code, out, _ = cli(capsys, "download", "ml-latest-small")
    assert code == 0 and "embedded" in out and "5 files verified" in out


def _copy_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_file():
            shutil.copyfile(p, dst / p.name)


@pytest.mark.skipif(not (SHARED_DATA / "ml-100k").is_dir(), reason="no shared data on this machine")
def test_real_ml100k_copy_with_one_byte_changed_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "ml-100k"
    _copy_files(SHARED_DATA / "ml-100k", bad)
    with open(bad / "u.data", "r+b") as fh:
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 1]))
    code, _, err = cli(capsys, "download", "movielens-100k", "--mirror", str(tmp_path))
    assert code == 2
    assert "checksum mismatch for u.data" in err and "expected md5 6e47046882bad158b0efbb84cd5cb987" in err
    assert nothing_cached("movielens-100k")


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="no shared data on this machine")
@pytest.mark.parametrize("where", ["ml-100k", ""])
def test_real_ml100k_and_gowalla_from_the_shared_folder(
    where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    mirror = str(SHARED_DATA / where) if where else str(SHARED_DATA)
    code, out, err = cli(capsys, "download", "movielens-100k", "--mirror", mirror)
    assert code == 0, err
    spec = get_spec("movielens-100k", load_registry())
    raw = cached_raw(spec)
    assert raw is not None and raw.checksums["u.data"] == "6e47046882bad158b0efbb84cd5cb987"
    if not where:
        code, out, err = cli(capsys, "download", "gowalla", "--mirror", mirror)
        assert code == 0, err
        g = cached_raw(get_spec("gowalla", load_registry()))
        assert g is not None and g.checksums["train.txt"] == "5eec1eb2edb8dd648377d348b8e136cf"


def test_the_test_server_itself(server: RangeServer) -> None:
    import requests

    url = server.add("f.bin", b"0123456789")
    assert requests.get(url, timeout=5).content == b"0123456789"
    r = requests.get(url, headers={"Range": "bytes=4-"}, timeout=5)
    assert (r.status_code, r.content, r.headers["Content-Range"]) == (206, b"456789", "bytes 4-9/10")
    assert requests.get(url, headers={"Range": "bytes=10-"}, timeout=5).status_code == 416
    server.ignore_range = True
    assert requests.get(url, headers={"Range": "bytes=4-"}, timeout=5).status_code == 200
    server.fail_next, server.corrupt = 1, True
    assert requests.get(url, timeout=5).status_code == 503
    assert requests.get(url, timeout=5).content == b"012345678" + bytes([ord("9") ^ 0xFF])
    assert requests.get(server.url + "/missing", timeout=5).status_code == 404
    assert server.statuses() == [200, 206, 416, 200, 503, 200, 404]


def test_local_mirror_skips_a_non_matching_subfolder(tmp_path: Path) -> None:
    for sub, damaged in (("aaa", True), ("zzz", False)):  # neither is named for the dataset
        (tmp_path / sub).mkdir()
        for n, d in FILES.items():
            (tmp_path / sub / n).write_bytes(b"other" + d if damaged else d)
    raw = ensure_raw(archive_spec(None), mirror=str(tmp_path), progress=False)
    assert_good_raw(raw, "mirror")
    marker = json.loads((raw.path / MARKER).read_text())
    assert marker["origin"] == str(tmp_path / "zzz")
