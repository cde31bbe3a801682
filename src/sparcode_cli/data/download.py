"""`sparcode download`: fetch a dataset's raw files into the cache, verified by checksum before any use.

Layout (under $SPARCODE_HOME):

    downloads/<archive>            a verified archive (kept, so a lost raw folder is re-extracted offline)
    downloads/<archive>.partial    an unfinished or unverified download; resumed with an HTTP Range request
    downloads/<name>/<file>[.partial]   the same for plain-file datasets (source = "files")
    raw/<name>/                    the raw files, directly in it (an archive's `archive_root/` is stripped)
    raw/<name>/.complete.json      written last: its presence means the folder is complete and verified

A raw folder is built in a temporary folder beside it and renamed into place only once every file verified,
so a half-extracted folder is never taken as complete.

Where files come from: the embedded copy (source = "embedded", never copied, never downloaded), else the
cache, else a mirror (`mirror` argument, else $SPARCODE_MIRROR), else the official URL(s) in datasets.toml.
A mirror is an HTTP(S) base URL (`<base>/<archive or file>`, then `<base>/<folder>/<...>` for the dataset's
name, aliases and archive root) or a local folder holding the archive or the extracted files, directly or in a
sub-folder. Checksums decide in every case.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlparse

from rich.console import Console

from sparcode_cli import __version__, paths
from sparcode_cli.atomic import file_digest, temp_dir, write_json
from sparcode_cli.data.registry import DatasetSpec, load_registry
from sparcode_cli.errors import UserError

MARKER = ".complete.json"
MARKER_VERSION = 1
CHUNK = 1 << 16
MIRROR_HINT = (
    "Use --mirror URL|DIR (or set SPARCODE_MIRROR) to point at a copy: an HTTP base URL, or a local folder "
    "holding {what}, directly or in a sub-folder named for the dataset."
)


@dataclass(frozen=True)
class RawData:
    """Verified raw files of one dataset."""

    path: Path  # folder holding the verified raw files (named as in spec.files)
    checksums: dict[str, str]  # file name -> md5, every file in spec.files
    source: str  # "embedded", "cache", "download", "mirror"


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try over HTTP. Env overrides: SPARCODE_RETRIES, SPARCODE_BACKOFF, SPARCODE_TIMEOUT."""

    retries: int = 4  # extra attempts after the first one
    backoff_s: float = 1.0  # wait before retry i (0-based): backoff_s * 2**i, capped at max_backoff_s
    max_backoff_s: float = 30.0
    timeout_s: float = 30.0  # connect and read timeout of each request

    def delay(self, retry: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * (2**retry))


def retry_policy() -> RetryPolicy:
    """The default policy with any SPARCODE_RETRIES / SPARCODE_BACKOFF / SPARCODE_TIMEOUT overrides."""
    kwargs: dict[str, Any] = {}
    for env, key, kind in (
        ("SPARCODE_RETRIES", "retries", int),
        ("SPARCODE_BACKOFF", "backoff_s", float),
        ("SPARCODE_TIMEOUT", "timeout_s", float),
    ):
        value = os.environ.get(env)
        if value is None or not value.strip():
            continue
        try:
            kwargs[key] = kind(value)
        except ValueError:
            raise UserError(
                f"{env}={value!r} is not a number", f"Unset it or give a {kind.__name__}."
            ) from None
        if kwargs[key] < 0:
            raise UserError(f"{env}={value!r} is negative", "Give a number >= 0.")
    return RetryPolicy(**kwargs)


# --------------------------------------------------------------------------------------------- public API


def cached_raw(spec: DatasetSpec) -> RawData | None:
    """The verified local copy (embedded folder, or a complete raw folder in the cache), or None. No network.

    A cached file whose size or modification time differs from the completion marker is hashed again.
    """
    if spec.source == "embedded":
        try:
            return _verify_embedded(spec)
        except UserError:
            return None
    folder = paths.raw_dir(spec.name)
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        if marker.get("version") != MARKER_VERSION or marker.get("dataset") != spec.name:
            return None
        if marker.get("archive_md5") != spec.archive_md5:
            return None  # the registry changed since this copy was made
        recorded = marker["files"]
        checksums: dict[str, str] = {}
        for f in spec.files:
            info = recorded[f.name]
            md5 = info["md5"]
            if f.md5 is not None and md5 != f.md5:
                return None
            st = (folder / f.name).stat()
            if st.st_size != info["size"]:
                return None
            if st.st_mtime_ns != info["mtime_ns"] and file_digest(folder / f.name) != md5:
                return None
            checksums[f.name] = md5
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return RawData(folder, checksums, "cache")


def ensure_raw(
    spec: DatasetSpec, mirror: str | None = None, force: bool = False, progress: bool = True
) -> RawData:
    """Return the dataset's verified raw files, fetching them if needed.

    The cached copy is returned if present and verified (unless `force`); otherwise the files come from
    `mirror` (argument, else $SPARCODE_MIRROR, else the official host) and are verified before use.
    """
    if spec.source == "embedded":
        return _verify_embedded(spec)
    if not force:
        hit = cached_raw(spec)
        if hit is not None:
            return hit
    out = _Out(progress)
    policy = retry_policy()
    kind, where = _resolve_mirror(mirror)
    if spec.source == "archive":
        return _ensure_archive(spec, kind, where, force, out, policy)
    return _ensure_files(spec, kind, where, force, out, policy)


@dataclass(frozen=True)
class DatasetRow:
    """One line of `sparcode datasets`."""

    name: str
    aliases: tuple[str, ...]
    title: str
    source: str
    size: str
    license: str
    cached: bool


def listing(registry: dict[str, DatasetSpec] | None = None) -> list[DatasetRow]:
    """The registry as rows for `sparcode datasets` (cached = a verified copy is on this machine)."""
    registry = registry if registry is not None else load_registry()
    rows = []
    for spec in registry.values():
        rows.append(
            DatasetRow(
                name=spec.name,
                aliases=spec.aliases,
                title=spec.title,
                source=_source_label(spec),
                size=human_size(spec.size_bytes),
                license=spec.license,
                cached=cached_raw(spec) is not None,
            )
        )
    return rows


def human_size(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # pragma: no cover


# ------------------------------------------------------------------------------------------------ helpers


class _Out:
    """Status lines and progress bars on stderr, only when progress output is wanted."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.console = Console(stderr=True, highlight=False)

    def say(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, markup=False)

    @contextlib.contextmanager
    def bar(self, label: str, total: int | None, completed: int) -> Iterator[Any]:
        if not self.enabled:
            yield lambda n: None
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.console,
        ) as bar:
            task = bar.add_task(label, total=total, completed=completed)
            yield lambda n: bar.advance(task, n)


def _source_label(spec: DatasetSpec) -> str:
    """'embedded', or the kind and the host(s), e.g. 'archive: grouplens.org', 'files: github'."""
    if spec.source == "embedded":
        return "embedded"
    urls = [spec.url] if spec.source == "archive" else [f.url for f in spec.files]
    hosts = []
    for u in urls:
        host = ".".join(urlparse(u or "").netloc.split(".")[-2:])
        host = "github" if host in ("githubusercontent.com", "github.com") else host
        if host and host not in hosts:
            hosts.append(host)
    return f"{spec.source}: {', '.join(hosts) or 'no URL, use --mirror'}"


def _resolve_mirror(mirror: str | None) -> tuple[str, str | Path | None]:
    """('url', base) | ('dir', Path) | ('official', None)."""
    value = mirror if mirror is not None and mirror.strip() else os.environ.get("SPARCODE_MIRROR", "")
    value = value.strip()
    if not value:
        return "official", None
    if re.match(r"^https?://", value, flags=re.IGNORECASE):
        return "url", value.rstrip("/")
    if value.lower().startswith("file://"):
        return "dir", Path(unquote(urlparse(value).path))
    return "dir", Path(value).expanduser()


def _folder_names(spec: DatasetSpec) -> list[str]:
    """Sub-folder names a mirror may keep the dataset under."""
    names = [spec.name, *spec.aliases]
    if spec.archive_root:
        names.append(spec.archive_root)
    if spec.archive:
        names.append(Path(spec.archive).stem)
    out: list[str] = []
    for n in names:
        if n and n not in out:
            out.append(n)
    return out


def _mirror_what(spec: DatasetSpec) -> str:
    """What a mirror folder must hold for this dataset, for messages."""
    names = ", ".join(f.name for f in spec.files)
    if not spec.archive:
        return names
    if any(f.md5 is None for f in spec.files):  # an extracted copy could not be verified
        return spec.archive
    return f"{spec.archive} or the extracted {names}"


def _mirror_urls(base: str, spec: DatasetSpec, filename: str) -> list[str]:
    return [f"{base}/{quote(filename)}"] + [
        f"{base}/{quote(d)}/{quote(filename)}" for d in _folder_names(spec)
    ]


def _hash_file(path: Path, algos: Iterable[str]) -> dict[str, str]:
    hashes = {a: hashlib.new(a) for a in algos}
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            for h in hashes.values():
                h.update(block)
    return {a: h.hexdigest() for a, h in hashes.items()}


def _copy_hashed(src: Path, dst: Path, algos: Iterable[str]) -> dict[str, str]:
    """Copy src to dst (a new file), hashing the bytes as they go."""
    hashes = {a: hashlib.new(a) for a in algos}
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(1 << 20):
            for h in hashes.values():
                h.update(block)
            fout.write(block)
    return {a: h.hexdigest() for a, h in hashes.items()}


def _archive_expected(spec: DatasetSpec) -> dict[str, str]:
    return {a: v for a, v in (("md5", spec.archive_md5), ("sha256", spec.archive_sha256)) if v}


def _mismatch(what: str, origin: str, expected: dict[str, str], got: dict[str, str]) -> str | None:
    """None if every expected digest matches, else the 'expected ..., got ...' text."""
    bad = [a for a, v in expected.items() if got.get(a) != v.lower()]
    if not bad:
        return None
    detail = "; ".join(f"expected {a} {expected[a]}, got {got.get(a)}" for a in bad)
    return f"checksum mismatch for {what} from {origin}: {detail}"


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _new_tmp_dir(spec: DatasetSpec) -> Path:
    target = paths.raw_dir(spec.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    return temp_dir(target.parent, f".{spec.name}.tmp-")


def _verify_embedded(spec: DatasetSpec) -> RawData:
    folder = spec.embedded_path
    checksums: dict[str, str] = {}
    for f in spec.files:
        p = folder / f.name
        if not p.is_file():
            raise UserError(
                f"the embedded copy of {spec.name} is incomplete: {p} is missing",
                "Reinstall sparcode (pip install --force-reinstall sparcode-cli).",
            )
        got = file_digest(p)
        if f.md5 is not None and got != f.md5:
            raise UserError(
                f"the embedded copy of {spec.name} is damaged: {f.name} has md5 {got}, expected {f.md5}",
                "Reinstall sparcode (pip install --force-reinstall sparcode-cli).",
            )
        checksums[f.name] = got
    return RawData(folder, checksums, "embedded")


def _verify_inner(spec: DatasetSpec, folder: Path, origin: str) -> dict[str, str]:
    """md5 of every file in spec.files inside `folder`, checked against the registry where recorded."""
    missing = [f.name for f in spec.files if not (folder / f.name).is_file()]
    if missing:
        raise UserError(
            f"{origin} lacks {', '.join(missing)}, needed by {spec.name}",
            "It is not the expected release; nothing was cached.",
        )
    checksums = {}
    for f in spec.files:
        got = file_digest(folder / f.name)
        if f.md5 is not None and got != f.md5:
            raise UserError(
                f"checksum mismatch for {f.name} from {origin}: expected md5 {f.md5}, got {got}",
                "The copy is damaged or a different release; nothing was cached. "
                "Fetch it again, or use --mirror URL|DIR with a good copy.",
            )
        checksums[f.name] = got
    return checksums


def _commit(spec: DatasetSpec, tmp: Path, checksums: dict[str, str], source: str, origin: str) -> RawData:
    """Write the completion marker (last, atomically) into `tmp`, then rename `tmp` onto the raw folder."""
    files = {}
    for name, md5 in checksums.items():
        st = (tmp / name).stat()
        files[name] = {"md5": md5, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    marker = {
        "version": MARKER_VERSION,
        "dataset": spec.name,
        "archive_md5": spec.archive_md5,
        "origin": origin,
        "sparcode": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
    }
    write_json(tmp / MARKER, marker)
    target = paths.raw_dir(spec.name)
    old = None
    if target.exists() or target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{spec.name}.old-", dir=target.parent))
        os.replace(target, old / "x")
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return RawData(target, dict(checksums), source)


# ---------------------------------------------------------------------------------------------- archives


def _plan_members(
    spec: DatasetSpec, archive: Path, infos: list[zipfile.ZipInfo]
) -> list[tuple[zipfile.ZipInfo, str]]:
    """(member, relative destination) for every member to extract; refuse the lot if one escapes."""
    bad: list[str] = []
    cleaned: list[tuple[zipfile.ZipInfo, list[str]]] = []
    for info in infos:
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        drive = len(parts[0]) >= 2 and parts[0][1] == ":"
        if name.startswith(("/", "\\")) or drive or ".." in parts or "\x00" in name:
            bad.append(name)
            continue
        clean = [p for p in parts if p not in ("", ".")]
        if clean:
            cleaned.append((info, clean))
    if bad:
        shown = ", ".join(repr(b) for b in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise UserError(
            f"refusing to extract {archive.name}: member(s) {shown} would land outside the target folder; "
            "nothing was extracted",
            "The archive is not the expected one and was removed. Fetch it from the official host or "
            "another --mirror.",
        )
    root = (spec.archive_root or "").strip("/")
    if root and any(c[0] == root for _, c in cleaned):
        cleaned = [(i, c[1:]) for i, c in cleaned if c[0] == root and len(c) > 1]
    return [(info, "/".join(c)) for info, c in cleaned]


def _extract(spec: DatasetSpec, archive: Path, source: str, origin: str) -> RawData:
    """Extract a verified archive into a fresh folder beside the raw folder, verify, then rename into place."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        _unlink(archive)
        raise UserError(f"{archive.name} is not a readable zip archive ({exc}); it was removed") from None
    with zf:
        try:
            plan = _plan_members(spec, archive, zf.infolist())
        except UserError:
            _unlink(archive)
            raise
        tmp = _new_tmp_dir(spec)
        try:
            top = tmp.resolve()
            for info, rel in plan:
                dest = tmp / rel
                if not dest.resolve().is_relative_to(top):  # belt and braces; _plan_members checked already
                    raise UserError(
                        f"refusing to extract {archive.name}: {info.filename!r} escapes the folder"
                    )
                if info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
            checksums = _verify_inner(spec, tmp, f"archive {archive.name}")
            return _commit(spec, tmp, checksums, source, origin)
        except zipfile.BadZipFile as exc:
            raise UserError(
                f"{archive.name} is damaged ({exc})", "Remove it and download it again."
            ) from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _ensure_archive(
    spec: DatasetSpec, kind: str, where: Any, force: bool, out: _Out, policy: RetryPolicy
) -> RawData:
    assert spec.archive, f"datasets.toml: [{spec.name}] has source = 'archive' but no archive name"
    dl = paths.downloads_dir()
    final, partial = dl / spec.archive, dl / f"{spec.archive}.partial"
    expected = _archive_expected(spec)
    if force:
        _unlink(final)
        _unlink(partial)
    elif final.is_file():
        if _mismatch(spec.archive, str(final), expected, _hash_file(final, expected)) is None:
            out.say(f"{spec.name}: using the verified archive {final}")
            return _extract(spec, final, "cache", str(final))
        _unlink(final)
    if kind == "dir":
        return _from_local_mirror(spec, where, out)
    if kind == "url":
        urls, source = _mirror_urls(where, spec, spec.archive), "mirror"
    else:
        if not spec.url:
            raise UserError(
                f"{spec.name} has no download URL in datasets.toml", MIRROR_HINT.format(what=spec.archive)
            )
        urls, source = [spec.url], "download"
    dl.mkdir(parents=True, exist_ok=True)
    with _session() as session:
        url = _fetch_verified(session, urls, partial, spec.archive, expected, out, policy, spec)
    os.replace(partial, final)
    return _extract(spec, final, source, url)


def _from_local_mirror(spec: DatasetSpec, base: Path, out: _Out) -> RawData:
    """Copy (and verify) the archive or the extracted files from a local folder into the cache.

    Candidates: the folder, its sub-folders named for the dataset, then any other immediate sub-folder; the
    archive is preferred to extracted files. The first candidate that verifies wins; if none does, the first
    failure in the folder or a named sub-folder is reported (other sub-folders may hold other datasets).
    """
    needed = [f.name for f in spec.files]
    if not base.exists():
        raise UserError(f"mirror folder {base} does not exist", MIRROR_HINT.format(what=_mirror_what(spec)))
    if base.is_file():
        if spec.archive and base.name == spec.archive:
            return _archive_from_file(spec, base, out)
        raise UserError(f"mirror {base} is a file, not a folder", MIRROR_HINT.format(what=_mirror_what(spec)))
    named, others = _mirror_dirs(spec, base)
    errors: list[UserError] = []  # from the folder itself and named sub-folders
    weak: list[UserError] = []  # from other sub-folders
    candidates = [(d, True) for d in named] + [(d, False) for d in others]
    if spec.archive:
        for d, is_named in candidates:
            if (d / spec.archive).is_file():
                try:
                    return _archive_from_file(spec, d / spec.archive, out)
                except UserError as exc:
                    (errors if is_named else weak).append(exc)
    unverifiable = [f.name for f in spec.files if f.md5 is None] if spec.source == "archive" else []
    for d, is_named in candidates:
        if not all((d / n).is_file() for n in needed):
            continue
        if unverifiable:
            if is_named:
                errors.append(
                    UserError(
                        f"the extracted files of {spec.name} in {d} cannot be verified "
                        f"(no checksum is recorded for {', '.join(unverifiable)})",
                        f"Put the archive {spec.archive} (md5 {spec.archive_md5}) in the mirror folder instead.",
                    )
                )
            continue
        try:
            return _files_from_dir(spec, d, out)
        except UserError as exc:
            (errors if is_named else weak).append(exc)
    if errors or weak:
        raise (errors or weak)[0]
    looked = f"{spec.archive} or {', '.join(needed)}" if spec.archive else ", ".join(needed)
    raise UserError(
        f"mirror folder {base} holds no copy of {spec.name}",
        f"Looked for {looked} in: {', '.join(str(d) for d in named + others)}. "
        f"Put {_mirror_what(spec)} there, or pass another --mirror.",
    )


def _mirror_dirs(spec: DatasetSpec, base: Path) -> tuple[list[Path], list[Path]]:
    """(the folder and its sub-folders named for the dataset, every other immediate sub-folder)."""
    named = [base] + [base / n for n in _folder_names(spec) if (base / n).is_dir()]
    others: list[Path] = []
    with contextlib.suppress(OSError):
        others = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    seen: set[Path] = set()
    out: tuple[list[Path], list[Path]] = ([], [])
    for group, dirs in zip(out, (named, others), strict=True):
        for d in dirs:
            key = d.resolve()
            if key not in seen:
                seen.add(key)
                group.append(d)
    return out


def _archive_from_file(spec: DatasetSpec, src: Path, out: _Out) -> RawData:
    assert spec.archive
    dl = paths.downloads_dir()
    dl.mkdir(parents=True, exist_ok=True)
    final, partial = dl / spec.archive, dl / f"{spec.archive}.partial"
    expected = _archive_expected(spec)
    out.say(f"{spec.name}: copying {src}")
    try:
        got = _copy_hashed(src, partial, expected or ("md5",))
    except BaseException:
        _unlink(partial)
        raise
    problem = _mismatch(spec.archive, str(src), expected, got)
    if problem:
        _unlink(partial)
        raise UserError(problem, "The mirror's copy is damaged or a different release; nothing was cached.")
    os.replace(partial, final)
    return _extract(spec, final, "mirror", str(src))


def _files_from_dir(spec: DatasetSpec, folder: Path, out: _Out) -> RawData:
    out.say(f"{spec.name}: copying {', '.join(f.name for f in spec.files)} from {folder}")
    tmp = _new_tmp_dir(spec)
    try:
        checksums = {}
        for f in spec.files:
            got = _copy_hashed(folder / f.name, tmp / f.name, ("md5",))["md5"]
            if f.md5 is not None and got != f.md5:
                raise UserError(
                    f"checksum mismatch for {f.name} from {folder}: expected md5 {f.md5}, got {got}",
                    "The mirror's copy is damaged or a different release; nothing was cached.",
                )
            checksums[f.name] = got
        return _commit(spec, tmp, checksums, "mirror", str(folder))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------ plain files


def _ensure_files(
    spec: DatasetSpec, kind: str, where: Any, force: bool, out: _Out, policy: RetryPolicy
) -> RawData:
    if kind == "dir":
        return _from_local_mirror(spec, where, out)
    dl = paths.downloads_dir() / spec.name
    if force and dl.exists():
        shutil.rmtree(dl, ignore_errors=True)
    dl.mkdir(parents=True, exist_ok=True)
    with _session() as session:
        for f in spec.files:
            final = dl / f.name
            expected = {"md5": f.md5} if f.md5 else {}
            if (
                final.is_file()
                and expected
                and _mismatch(f.name, "", expected, _hash_file(final, ["md5"])) is None
            ):
                continue
            _unlink(final)
            if kind == "url":
                urls = _mirror_urls(where, spec, f.name)
            elif f.url:
                urls = [f.url]
            else:
                raise UserError(
                    f"{spec.name}: no URL is recorded for {f.name}", MIRROR_HINT.format(what=f.name)
                )
            partial = dl / f"{f.name}.partial"
            _fetch_verified(session, urls, partial, f.name, expected, out, policy, spec)
            os.replace(partial, final)
    tmp = _new_tmp_dir(spec)
    try:
        for f in spec.files:
            shutil.move(dl / f.name, tmp / f.name)  # same file system as a rule; move copes if not
        checksums = _verify_inner(spec, tmp, f"the download of {spec.name}")
        raw = _commit(
            spec, tmp, checksums, "mirror" if kind == "url" else "download", str(where or "official URLs")
        )
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(dl, ignore_errors=True)
    return raw


# -------------------------------------------------------------------------------------------------- HTTP


class _Transient(Exception):
    """Worth retrying: connection trouble, timeouts, 5xx/408/429, a body cut short."""


class _Gone(Exception):
    """This URL will not work (404, 403, ...): try the next candidate."""


class _Restart(Exception):
    """The partial file was discarded: fetch again at once from byte 0."""


@contextlib.contextmanager
def _session() -> Iterator[Any]:
    import requests

    with requests.Session() as s:
        s.headers["User-Agent"] = f"sparcode/{__version__}"
        yield s


def _short(exc: BaseException) -> str:
    text = str(exc)
    m = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if m:
        return m.group(1).strip()
    if "timed out" in text.lower():
        return "timed out"
    if "IncompleteRead" in text or "Connection broken" in text:
        return "connection broken before the end of the file"
    return (type(exc).__name__ + (f": {text}" if text else ""))[:200]


def _fetch_verified(
    session: Any,
    urls: list[str],
    partial: Path,
    what: str,
    expected: dict[str, str],
    out: _Out,
    policy: RetryPolicy,
    spec: DatasetSpec,
) -> str:
    """Download the first URL that works into `partial` and verify it; return that URL.

    A mismatch after a resumed download is retried once from byte 0 (the partial may have been stale); any
    other mismatch removes the file and is an error.
    """
    gone: list[str] = []
    for url in urls:
        fresh_retry = False
        while True:
            try:
                resumed = _http_fetch(session, url, partial, what, out, policy, spec)
            except _Gone as exc:
                gone.append(f"{url} ({exc})")
                break
            got = _hash_file(partial, expected or ("md5",))
            problem = _mismatch(what, url, expected, got)
            if problem is None:
                if not expected:
                    out.say(f"warning: no checksum is recorded for {what}; md5 {got['md5']} (not verified)")
                return url
            _unlink(partial)
            if resumed and not fresh_retry:
                out.say(f"{what}: the resumed download does not verify; starting over")
                fresh_retry = True
                continue
            raise UserError(
                problem + "; the file was removed",
                "The download was corrupted or the server holds a different file. Try again, or use "
                "--mirror URL|DIR with a good copy.",
            )
    listing_ = "; ".join(gone)
    raise UserError(
        f"could not find {what} for {spec.name}: tried {listing_}",
        MIRROR_HINT.format(what=_mirror_what(spec)),
    )


def _http_fetch(
    session: Any, url: str, partial: Path, what: str, out: _Out, policy: RetryPolicy, spec: DatasetSpec
) -> bool:
    """Fetch `url` into `partial` with retries and resume; True if any bytes were appended to a partial."""
    last = "failed"
    attempts = policy.retries + 1
    resumed = False
    restarted = False
    attempt = 0
    while attempt < attempts:
        if attempt:
            delay = policy.delay(attempt - 1)
            out.say(f"{what}: {last}; retry {attempt}/{policy.retries} in {delay:g}s")
            time.sleep(delay)
        try:
            resumed = _http_once(session, url, partial, what, out, policy) or resumed
            return resumed
        except _Restart:
            if restarted:  # a second restart in a row: count it as a failure
                attempt += 1
            restarted = True
            continue
        except _Transient as exc:
            last = str(exc)
            attempt += 1
    host = urlparse(url).netloc or url
    raise UserError(
        f"could not download {what} from {host}: {last} (after {attempts} "
        f"attempt{'s' if attempts != 1 else ''})",
        "If this machine is offline or the host is down: "
        + MIRROR_HINT.format(what=_mirror_what(spec))
        + " A partial download is kept and resumed next time.",
    )


def _content_range_start(value: str | None) -> int | None:
    m = re.match(r"^\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*$", value or "")
    return int(m.group(1)) if m else None


def _http_once(session: Any, url: str, partial: Path, what: str, out: _Out, policy: RetryPolicy) -> bool:
    import requests

    offset = partial.stat().st_size if partial.exists() else 0
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        with session.get(url, headers=headers, stream=True, timeout=policy.timeout_s) as resp:
            status = resp.status_code
            if status == 416 and offset:
                out.say(f"{what}: the server refused to resume (HTTP 416); starting over")
                _unlink(partial)
                raise _Restart()
            if status >= 500 or status in (408, 425, 429):
                raise _Transient(f"HTTP {status} {resp.reason or ''}".strip())
            if status not in (200, 206):
                raise _Gone(f"HTTP {status} {resp.reason or ''}".strip())
            if status == 206:
                start = _content_range_start(resp.headers.get("Content-Range"))
                if start != offset:
                    out.say(
                        f"{what}: the server answered another range ({resp.headers.get('Content-Range')}); "
                        "starting over"
                    )
                    _unlink(partial)
                    raise _Restart()
                mode = "ab"
                if offset:
                    out.say(f"{what}: resuming at byte {offset}")
            else:
                if offset:
                    out.say(
                        f"{what}: the server ignored the resume request (HTTP 200); starting the file over"
                    )
                offset, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            total = offset + int(length) if length and length.isdigit() else None
            written = 0
            out.say(f"{what}: downloading {url}")
            with open(partial, mode) as fh, out.bar(what, total, offset) as advance:
                for chunk in resp.iter_content(CHUNK):
                    fh.write(chunk)
                    written += len(chunk)
                    advance(len(chunk))
            if total is not None and offset + written < total:
                raise _Transient(f"connection closed after {offset + written} of {total} bytes")
            return mode == "ab" and offset > 0
    except (
        requests.exceptions.InvalidURL,
        requests.exceptions.MissingSchema,
        requests.exceptions.InvalidSchema,
    ) as e:
        raise UserError(f"invalid URL {url!r} ({e})", MIRROR_HINT.format(what=what)) from None
    except requests.exceptions.RequestException as exc:
        raise _Transient(_short(exc)) from exc
