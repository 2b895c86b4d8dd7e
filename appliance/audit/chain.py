"""One line of the audit chain: the bytes the writer produces, its hash, and the strict reading
verify applies (exactly those bytes, no key twice, a hash that matches)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

GENESIS = "0" * 64
ROTATED_EVENT = "audit_rotated"  # the first line of every file after the first: which file it continues


class BadLine(ValueError):
    """A line that is not one the writer could have produced; the message says why, in words."""


def digest(prev: str, record: dict[str, Any]) -> str:
    body = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256((prev + "\n" + body).encode()).hexdigest()


def seal(prev: str, record: dict[str, Any]) -> dict[str, Any]:
    """The line for `record` chained onto `prev`."""
    rec = {k: v for k, v in record.items() if k not in ("prev", "hash")}
    return {**rec, "prev": prev, "hash": digest(prev, rec)}


def encode(line: dict[str, Any]) -> bytes:
    """The canonical bytes of a line, newline included: the only form verify accepts."""
    return (json.dumps(line, sort_keys=True, ensure_ascii=False) + "\n").encode()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for k, _ in pairs:
        if k in seen:
            raise BadLine(f"it names the key {k!r} twice")
        seen.add(k)
    return dict(pairs)


def parse(raw: bytes) -> dict[str, Any]:
    """The line `raw` (with its newline) as written by `encode(seal(...))`, or BadLine."""
    if not raw.endswith(b"\n"):
        raise BadLine("it does not end with a newline (a torn write)")
    try:
        line = json.loads(raw, object_pairs_hook=_no_duplicates)
    except BadLine:
        raise
    except ValueError:
        raise BadLine("it is not JSON") from None
    if not isinstance(line, dict) or not isinstance(line.get("prev"), str) or not isinstance(line.get("hash"), str):
        raise BadLine("it is not an object with a prev and a hash")
    if encode(line) != raw:
        raise BadLine("it is not in the canonical form the writer produces (it was re-encoded or edited)")
    record = {k: v for k, v in line.items() if k not in ("prev", "hash")}
    if digest(line["prev"], record) != line["hash"]:
        raise BadLine("its hash does not match its content (it was edited)")
    return line


def tail_hash(raw: bytes) -> str:
    """What the next line chains onto after `raw`: its `hash`, or, for a torn or foreign line, the
    hash of its bytes (so verify still points at it)."""
    try:
        return str(json.loads(raw)["hash"])
    except (ValueError, KeyError, TypeError):
        return hashlib.sha256(raw.rstrip(b"\n")).hexdigest()
