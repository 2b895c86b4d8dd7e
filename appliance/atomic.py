"""Writes that survive power loss: temp file in the same directory, fsync, rename, fsync the directory."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

PARTIAL_SUFFIX = ".partial"


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(dest: Path, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """Yield a binary file that replaces `dest` only when the block ends without an exception.

    The temp file sits beside `dest` with a `.partial` suffix so that a crash leaves a name
    that cleaners recognise and nothing ever mistakes for the real file.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=PARTIAL_SUFFIX, dir=dest.parent)
    tmp_path = Path(tmp)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, dest)
        fsync_dir(dest.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(dest: Path, data: bytes, mode: int = 0o644) -> None:
    with atomic_file(dest, mode) as f:
        f.write(data)


def atomic_write_json(dest: Path, value: Any, mode: int = 0o644) -> None:
    atomic_write_bytes(dest, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode(), mode)


def atomic_symlink(target: str, link: Path) -> None:
    """Point `link` at `target` in one rename, so readers see the old target or the new one."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def remove_partials(directory: Path) -> list[Path]:
    """Delete leftovers of interrupted atomic writes in `directory`; return what was removed."""
    removed = []
    if directory.is_dir():
        for p in directory.iterdir():
            if p.name.endswith(PARTIAL_SUFFIX) and (p.is_file() or p.is_symlink()):
                p.unlink()
                removed.append(p)
    return removed
