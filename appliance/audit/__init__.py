"""The hash-chained audit log, /var/log/appliance/audit.jsonl and the files rotated before it.

Each line is a JSON object with `prev` (the previous line's `hash`, 64 zeros for the very first)
and `hash` (SHA-256 over `prev` and the canonical JSON of the record). Editing a line breaks its
own hash; deleting or reordering lines breaks the next line's `prev`. A file that passes
`[server] audit_rotate_bytes` is renamed audit-<time>.jsonl and the next file's first line
continues it; rotated files are deleted after `[server] audit_retention_days`. Appends and
rotations take one flock (audit.lock), so the server, the trainer and root's commands can write
the same chain. A process run as root also moves the anchor (appliance/audit/anchor.py) to the new
head after checking the chain from the old one: what the service user cannot forge.
"""

from __future__ import annotations

import logging
import os
import tomllib
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from appliance.atomic import fsync_dir
from appliance.audit.anchor import Anchor, may_anchor, read_anchor, write_anchor
from appliance.audit.chain import GENESIS, ROTATED_EVENT, encode, seal, tail_hash
from appliance.audit.files import (
    chain_files,
    hand_to_directory_owner,
    last_line,
    line_count,
    locked,
    open_file,
    prune,
    rotation_name,
)
from appliance.audit.sampler import Sampler
from appliance.audit.verify import Result, check, check_since
from appliance.config import ConfigError, ServerConfig, validate_section
from appliance.errors import ApplianceError, StateError
from appliance.paths import Layout

log = logging.getLogger("appliance.audit")
__all__ = ["GENESIS", "Anchor", "Result", "Sampler", "append", "limits", "read_anchor", "verify", "verify_log"]


def limits(layout: Layout) -> tuple[int, int]:
    """(audit_rotate_bytes, audit_retention_days) from [server] of appliance.toml; the defaults
    when there is no config (or it is broken: the audit line matters more than the setting)."""
    try:
        st = os.stat(layout.config_file)
        stamp: tuple[Any, ...] = (str(layout.config_file), st.st_mtime_ns, st.st_size, st.st_ino)
    except OSError:
        stamp = (str(layout.config_file),)
    cached = _limits_cache.get("entry")
    if cached is not None and cached[0] == stamp:  # the server appends per request: parse the file when it changes
        return cached[1]
    try:
        raw = tomllib.loads(layout.config_file.read_text())
        server = validate_section(ServerConfig, "server", raw.get("server"))
    except (OSError, ValueError, ConfigError):
        server = ServerConfig()
    value = (server.audit_rotate_bytes, server.audit_retention_days)
    _limits_cache["entry"] = (stamp, value)
    return value


_limits_cache: dict[str, tuple[tuple[Any, ...], tuple[int, int]]] = {}


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _stamp(now: datetime) -> str:
    return now.isoformat(timespec="milliseconds")


def _continue(f: Any, path: Path, now: datetime) -> str:
    """The hash an empty file's first line chains onto: the genesis, or (after a rotation) a line
    naming the file it continues, chained onto that file's last line."""
    before = [p for p in chain_files(path) if p != path]
    if not before:
        return GENESIS
    with os.fdopen(open_file(before[-1]), "rb") as pf:
        n, prev = line_count(pf), tail_hash(last_line(pf))
    header = seal(prev, {"event": ROTATED_EVENT, "previous_file": before[-1].name, "previous_lines": n,
                         "time": _stamp(now), "uid": os.getuid()})
    f.write(encode(header))
    return str(header["hash"])


def _write(path: Path, rec: dict[str, Any], rotate_bytes: int, retention_days: int) -> dict[str, Any]:
    """Under the lock: rotate when due, then append one line."""
    now = _now()  # taken under the lock, so rotated names follow the order of rotations
    try:
        size = os.lstat(path).st_size
    except FileNotFoundError:
        size = 0
    if size >= rotate_bytes:
        os.rename(path, rotation_name(path.parent, now))  # a rename never follows a link
        fsync_dir(path.parent)
        prune(path.parent, retention_days, now)
    fd = open_file(path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
    with os.fdopen(fd, "r+b") as f:
        if f.seek(0, os.SEEK_END) == 0:
            hand_to_directory_owner(fd, path.parent)
            prev = _continue(f, path, now)
        else:
            tail = last_line(f)
            if not tail.endswith(b"\n"):  # a write torn by power loss: end it, so the next line stands on its own
                f.write(b"\n")
            prev = tail_hash(tail)
        line = seal(prev, rec)
        f.write(encode(line))
        f.flush()
        os.fsync(f.fileno())
    return line


def _move_anchor(layout: Layout, retention_days: int, now: datetime, since: Anchor | None = None) -> Result | None:
    """Under the lock: check from the anchored line (or `since`, a head just checked) to the head;
    when intact, anchor the head. None when there is no anchored line to start from: only a check
    of the whole chain, outside the lock, can start the anchor (`verify_log`)."""
    try:
        start = since or read_anchor(layout)
        result = check_since(layout.audit_log, start, retention_days, now=now) if start else None
    except ApplianceError as e:
        return Result(False, problem=e.message)
    if result is None:
        return None
    if result.ok and result.head is not None:
        try:
            write_anchor(layout, replace(result.head, time=_stamp(now)))
        except ApplianceError as e:  # the line is written; the command it records goes on, loudly
            result = Result(False, problem=e.message)
    if not result.ok:
        log.warning("The audit anchor stays where it was: %s Run `appliance audit verify`.", result.problem)
    return result


def append(layout: Layout, record: dict[str, Any], path: Path | None = None, *, anchor: bool | None = None) -> dict[str, Any]:
    """Append one record (`time` and the writer's `uid` added when missing); return the line as
    written. `anchor`: move the anchor to it (default: when this process may, i.e. root)."""
    path = path or layout.audit_log
    path.parent.mkdir(parents=True, exist_ok=True)
    now = _now()
    rec = {k: v for k, v in record.items() if k not in ("prev", "hash")}
    rec.setdefault("time", _stamp(now))
    rec.setdefault("uid", os.getuid())
    if (sudo := os.environ.get("SUDO_UID", "")).isdigit():  # root's command, run through sudo by this user
        rec.setdefault("sudo_uid", int(sudo))
    rotate_bytes, retention_days = limits(layout)
    anchoring = path == layout.audit_log and (may_anchor(layout) if anchor is None else anchor)
    with locked(path.parent):
        line = _write(path, rec, rotate_bytes, retention_days)
        moved = _move_anchor(layout, retention_days, now) if anchoring else False
    if moved is None:  # no anchored line to start from: check the whole chain without holding up the server
        verify_log(layout, anchor=True)
    return line


def verify_log(layout: Layout, path: Path | None = None, *, anchor: bool | None = None) -> Result:
    """The whole chain through the anchor (or one file, `path`, on its own); when intact and this
    process may (root), anchor the head as it is after the check."""
    retention_days = limits(layout)[1]
    if path is not None and Path(path) != layout.audit_log:
        return check(Path(path), read_anchor(layout), retention_days, only=[Path(path)])
    result = check(layout.audit_log, read_anchor(layout), retention_days)
    if not result.ok:
        if anchor is not False and may_anchor(layout):
            log.warning("The audit anchor stays where it was: %s", result.problem)
        return result
    if result.head is not None and (may_anchor(layout) if anchor is None else anchor):
        with locked(layout.log_dir):  # only the lines appended since the check are read under the lock
            moved = _move_anchor(layout, retention_days, _now(), since=replace(result.head, time=_now().isoformat()))
        if moved is not None and not moved.ok:
            return moved
    return result


def verify(layout: Layout, path: Path | None = None) -> tuple[bool, int | None]:
    """(True, None) when the chain is intact; else (False, the first bad line, 1-based, or None)."""
    try:
        r = verify_log(layout, path, anchor=False)
    except StateError:
        return False, None
    return r.ok, r.bad_line
