"""The dataset registry (`datasets.toml`): names, aliases, sources, checksums, licenses."""

from __future__ import annotations

import difflib
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparcode_cli.errors import UserError
from sparcode_cli.paths import EMBEDDED_DIR, PACKAGE_DIR

SOURCES = ("embedded", "archive", "files")


@dataclass(frozen=True)
class FileSpec:
    """One raw file a dataset needs: its name, md5 (None if none is recorded), and URL (source=files)."""

    name: str
    md5: str | None = None
    url: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    title: str
    source: str  # embedded | archive | files
    format: str  # parser name used by preprocess
    files: tuple[FileSpec, ...]
    aliases: tuple[str, ...] = ()
    url: str | None = None  # the archive URL (source=archive)
    archive: str | None = None  # archive file name, e.g. ml-100k.zip
    archive_root: str | None = None  # folder inside the archive
    archive_md5: str | None = None
    archive_sha256: str | None = None
    embedded_dir: str | None = None
    size_bytes: int | None = None
    license: str = ""
    citation: str = ""
    features: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, hash=False)  # hash=False keeps specs hashable

    @property
    def embedded_path(self) -> Path:
        assert self.embedded_dir is not None
        return EMBEDDED_DIR / self.embedded_dir


def registry_path() -> Path:
    """$SPARCODE_REGISTRY, else the project's datasets.toml (repository root), else a packaged copy."""
    env = os.environ.get("SPARCODE_REGISTRY")
    if env:
        return Path(env)
    for candidate in (PACKAGE_DIR.parent.parent / "datasets.toml", PACKAGE_DIR / "datasets.toml"):
        if candidate.is_file():
            return candidate
    raise UserError("the dataset registry datasets.toml was not found", "Set SPARCODE_REGISTRY to its path.")


def _parse(name: str, table: Any) -> DatasetSpec:
    if not isinstance(table, dict):
        raise UserError(f"datasets.toml: {name!r} is not a [table]", "Each dataset is a [name] table.")
    files = tuple(
        FileSpec(fname, (info or {}).get("md5"), (info or {}).get("url"))
        for fname, info in table.get("files", {}).items()
    )
    source = table.get("source")
    if source not in SOURCES:
        raise UserError(
            f"datasets.toml: [{name}] has source {source!r}; expected one of {', '.join(SOURCES)}"
        )
    known = {f.name for f in DatasetSpec.__dataclass_fields__.values()} - {
        "files",
        "name",
        "extra",
        "aliases",
    }
    kwargs = {k: v for k, v in table.items() if k in known}
    for key in ("features",):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    extra = {k: v for k, v in table.items() if k not in known and k not in ("files", "aliases")}
    return DatasetSpec(
        name=name,
        files=files,
        aliases=tuple(table.get("aliases", ())),
        extra=extra,
        **{k: v for k, v in kwargs.items() if k != "title"},
        title=table.get("title", name),
    )


def load_registry(path: Path | None = None) -> dict[str, DatasetSpec]:
    path = path or registry_path()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(
            f"cannot read the dataset registry {path} ({exc.strerror})", "Check SPARCODE_REGISTRY."
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML ({exc})") from exc
    return {name: _parse(name, table) for name, table in raw.items()}


def get_spec(name: str, registry: dict[str, DatasetSpec] | None = None) -> DatasetSpec:
    """Look a dataset up by name or alias (case-insensitive); unknown names list the known ones."""
    registry = registry if registry is not None else load_registry()
    key = name.strip().lower()
    for spec in registry.values():
        if key == spec.name.lower() or key in (a.lower() for a in spec.aliases):
            return spec
    names = sorted(registry)
    every = names + [a for s in registry.values() for a in s.aliases]
    close = difflib.get_close_matches(key, every, n=1, cutoff=0.5)
    hint = f"Did you mean {close[0]!r}? " if close else ""
    raise UserError(
        f"unknown dataset {name!r}",
        f"{hint}Known datasets: {', '.join(names)}. A path to your own CSV/Parquet file also works.",
    )
