"""The hash-chained audit log, /var/log/appliance/audit.jsonl.

Each line is a JSON object with `prev` (the previous line's `hash`, 64 zeros for the first) and
`hash` (SHA-256 over `prev` and the canonical JSON of the record). Editing a line breaks its own
hash; deleting or reordering lines breaks the next line's `prev`. Appends take an exclusive flock,
so the server and the installer can write the same file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from appliance.errors import StateError
from appliance.paths import Layout

GENESIS = "0" * 64


def _digest(prev: str, record: dict[str, Any]) -> str:
    body = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256((prev + "\n" + body).encode()).hexdigest()


def _last_hash(f: Any) -> str:
    """The `hash` of the file's last line, reading only its tail."""
    end = f.seek(0, os.SEEK_END)
    if end == 0:
        return GENESIS
    back = min(end, 65536)
    f.seek(end - back)
    tail = f.read(back).rstrip(b"\n").rsplit(b"\n", 1)[-1]
    try:
        return str(json.loads(tail)["hash"])
    except (ValueError, KeyError, TypeError):
        # A torn or foreign last line: chain onto its bytes so verify still points at it.
        return hashlib.sha256(tail).hexdigest()


def append(layout: Layout, record: dict[str, Any], path: Path | None = None) -> dict[str, Any]:
    """Append one record (a `time` is added when missing); return the line as written."""
    path = path or layout.audit_log
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {k: v for k, v in record.items() if k not in ("prev", "hash")}
    rec.setdefault("time", datetime.now(timezone.utc).isoformat(timespec="milliseconds"))
    try:
        # O_NOFOLLOW: the log's directory is the service user's, and root appends here too; a link
        # planted in its place (to a sudoers file, say) must not be written through.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    except OSError as e:
        if path.is_symlink():
            raise StateError(f"The audit log {path} is a symbolic link; nothing was written through it.",
                             "Someone replaced the log: keep the link for the investigation, move it aside, and run the command again.") from None
        raise StateError(f"The audit log {path} cannot be opened: {e.strerror}.") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StateError(f"The audit log {path} is not a regular file; nothing was written.", "Move it aside and run the command again.")
    with os.fdopen(fd, "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            prev = _last_hash(f)
            line = {**rec, "prev": prev, "hash": _digest(prev, rec)}
            f.write((json.dumps(line, sort_keys=True, ensure_ascii=False) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    return line


def verify(layout: Layout, path: Path | None = None) -> tuple[bool, int | None]:
    """(True, None) when every line chains onto the one before; else (False, first bad line, 1-based)."""
    path = path or layout.audit_log
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return True, None
    prev = GENESIS
    for n, raw in enumerate(data.splitlines(), start=1):
        try:
            line = json.loads(raw)
            claimed = line.pop("hash")
            line_prev = line.pop("prev")
        except (ValueError, KeyError, TypeError, AttributeError):
            return False, n
        if line_prev != prev or claimed != _digest(prev, line):
            return False, n
        prev = claimed
    return True, None
