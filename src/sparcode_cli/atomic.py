"""Atomic file writes: write to a temporary name in the same folder, fsync, rename.

An interrupted command therefore leaves the last good file (or none), never a partial one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_dir(parent: Path, prefix: str, suffix: str = "") -> Path:
    """A new temporary folder in `parent` with the mode a plain `mkdir` gives (mkdtemp's is private), since
    it is renamed into a published folder."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is renamed onto `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        tmp_path.chmod(0o666 & ~_umask())  # mkstemp's 0600 would make a published artifact private
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(target: str | os.PathLike[str], text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | os.PathLike[str], obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def file_digest(path: str | os.PathLike[str], algo: str = "md5", chunk: int = 1 << 20) -> str:
    """Hex digest of a file, streamed."""
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def exclusive_lock(folder: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder/.lock` (created if needed) while the block runs, or raise a UserError
    naming the process that holds it. The kernel drops the lock when its holder exits, so a killed run never
    leaves a stale one."""
    import fcntl

    from sparcode_cli.errors import UserError

    path = Path(folder) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held open for the whole block)
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise UserError(
                f"{what} is in use by {holder}",
                hint="wait for it to finish, or stop it; two processes must not write one folder",
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {os.uname().nodename}")
        fh.flush()
        yield
    finally:
        fh.close()
