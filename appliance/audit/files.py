"""The files of the audit chain: audit.jsonl, the rotated audit-YYYYMMDDTHHMMSSZ[-N].jsonl before it
(oldest first), the lock every appender takes, and retention.

The log's directory belongs to the service user and root appends there too, so every open refuses
a link, a FIFO, a device and a hard-linked file: a planted name must not make root write, or wait,
anywhere else.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO

from appliance.atomic import fsync_dir
from appliance.errors import StateError
from appliance.nofollow import open_file as open_regular
from appliance.nofollow import why

LOCK_NAME = "audit.lock"
ROTATED = re.compile(r"audit-(\d{8}T\d{6}Z)(?:-(\d+))?\.jsonl\Z")
STAMP = "%Y%m%dT%H%M%SZ"
LOCK_WAIT_S = 30.0
_CHUNK = 1 << 20


def rotated_at(name: str) -> datetime | None:
    """When a rotated file was closed (from its name), or None for any other name."""
    m = ROTATED.match(name)
    return datetime.strptime(m.group(1), STAMP).replace(tzinfo=timezone.utc) if m else None


def _order(p: Path) -> tuple[str, int]:
    m = ROTATED.match(p.name)
    assert m is not None
    return m.group(1), int(m.group(2) or 0)


def chain_files(current: Path) -> list[Path]:
    """Every file of the chain that ends in `current`, oldest first (`current` only if it exists)."""
    try:
        names = os.listdir(current.parent)
    except FileNotFoundError:
        return []
    rotated = sorted((current.parent / n for n in names if ROTATED.match(n)), key=_order)
    return rotated + ([current] if os.path.lexists(current) else [])


def open_file(path: Path, flags: int = os.O_RDONLY) -> int:
    """A descriptor on `path`, which must be a regular file with one name, never followed through a link."""
    try:
        fd = open_regular(path, flags, 0o640)
    except OSError as e:
        raise StateError(f"The audit file {path} cannot be opened: {why(e)}; nothing was read or written through it.",
                         "If someone replaced it, keep it for the investigation, move it aside, and run the command again.") from None
    if os.fstat(fd).st_nlink != 1:
        os.close(fd)
        raise StateError(f"The audit file {path} has more than one name (a hard link); nothing was read or written.",
                         "Move it aside and run the command again.")
    return fd


def hand_to_directory_owner(fd: int, directory: Path) -> None:
    """Root created this file in the service's directory: give it to the directory's owner, so the
    server can keep appending after a rotation that a root command did."""
    if os.geteuid() == 0:
        st = os.stat(directory, follow_symlinks=False)
        os.fchown(fd, st.st_uid, st.st_gid)


@contextlib.contextmanager
def locked(log_dir: Path) -> Iterator[None]:
    """The appenders' lock (audit.lock beside the log): one append or rotation at a time, in any
    process. A holder that never lets go is an error after LOCK_WAIT_S, not a hang."""
    path = log_dir / LOCK_NAME
    fd = open_file(path, os.O_RDONLY | os.O_CREAT)  # flock needs no write access: root's file serves the service too
    try:
        os.fchmod(fd, 0o644) if os.fstat(fd).st_uid == os.geteuid() else None
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StateError(f"The audit log lock {path} has been held for {LOCK_WAIT_S:.0f} s; nothing was written.",
                                     "Find the process holding it (`fuser` on the file) and run the command again.") from None
                time.sleep(0.005)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def line_count(f: IO[bytes]) -> int:
    """Newlines in the whole file, read in chunks."""
    f.seek(0)
    n = 0
    while chunk := f.read(_CHUNK):
        n += chunk.count(b"\n")
    return n


def last_line(f: IO[bytes], end: int | None = None) -> bytes:
    """The line that ends at byte `end` (default: the end of the file), newline included; b"" at 0."""
    end = f.seek(0, os.SEEK_END) if end is None else end
    start, buf = end, b""
    while start > 0:
        step = min(start, 65536)
        start -= step
        f.seek(start)
        buf = f.read(step) + buf
        cut = buf.rfind(b"\n", 0, len(buf) - 1)
        if cut >= 0:
            return buf[cut + 1:]
    return buf


def rotation_name(log_dir: Path, now: datetime) -> Path:
    """A name for the file being closed now that sorts after every rotated file already there (even
    when the clock went back, or two rotations fall in one second)."""
    stamp, n = now.astimezone(timezone.utc).strftime(STAMP), 0
    existing = [p for p in chain_files(log_dir / "audit.jsonl") if ROTATED.match(p.name)]
    newest = _order(existing[-1]) if existing else None
    if newest is not None and newest[0] >= stamp:
        stamp, n = newest[0], newest[1] + 1
    path = log_dir / (f"audit-{stamp}.jsonl" if n <= 1 else f"audit-{stamp}-{n}.jsonl")
    while os.path.lexists(path):
        n = max(n, 1) + 1
        path = log_dir / f"audit-{stamp}-{n}.jsonl"
    return path


def prune(log_dir: Path, retention_days: int, now: datetime) -> list[str]:
    """Delete rotated files closed more than `retention_days` ago, oldest first; never a newer one."""
    cutoff = now - timedelta(days=retention_days)
    removed = []
    for p in chain_files(log_dir / "audit.jsonl"):
        closed = rotated_at(p.name)
        if closed is None or closed >= cutoff:
            break
        os.unlink(p)
        removed.append(p.name)
    if removed:
        fsync_dir(log_dir)
    return removed
