"""API keys: /etc/appliance/api-keys.json holds only SHA-256 hashes of keys, never a key itself.

A key is `apl-<id>-<secret>`: the id selects the record, the secret (32 random bytes) is what the
hash protects. A plain SHA-256 is enough because the secret is random, not a password: there is
nothing to guess with a dictionary. Records are kept after revocation so `keys list` can show them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import threading
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from appliance import audit
from appliance.atomic import atomic_file
from appliance.errors import ApplianceError
from appliance.paths import Layout

ROLES = ("admin", "user")
PREFIX = "apl"


class ApiKeyError(ApplianceError):
    """An API key that cannot be created, found or revoked as asked."""


@dataclass(frozen=True)
class KeyRecord:
    id: str
    role: str
    hash: str
    created_at: str
    revoked_at: str | None = None
    # Per-key limits; None (also every record written before they existed): the [server] default.
    rpm: int | None = None
    tpm: int | None = None
    max_live: int | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def keys_file(layout: Layout) -> Path:
    return layout.etc / "api-keys.json"


def _hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _read(layout: Layout) -> list[KeyRecord]:
    path = keys_file(layout)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise ApiKeyError(f"The key file {path} cannot be read: {e}.", "Restore it from backup or move it away and create new keys.") from None
    try:
        return [KeyRecord(**r) for r in data["keys"]]
    except (KeyError, TypeError):
        raise ApiKeyError(f"The key file {path} is not in the expected format.") from None


def _write(layout: Layout, records: list[KeyRecord]) -> None:
    """Replace the file atomically, keeping the owner, group and mode it already had.

    0640 for a new file: the server runs as the `appliance` user; the installer makes /etc/appliance
    root:appliance with setgid, so this file (written by root) is readable by that group and nobody
    else. A rewrite keeps whatever ownership and mode the file had, so `appliance keys` run as root
    never locks the service out.
    """
    path = keys_file(layout)
    try:
        st = os.stat(path)
        mode, owner = stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid)
    except FileNotFoundError:
        mode, owner = 0o640, None
    data = (json.dumps({"version": 1, "keys": [asdict(r) for r in records]}, indent=2, sort_keys=True) + "\n").encode()
    with atomic_file(path, mode) as f:
        if owner and os.geteuid() == 0:
            os.fchown(f.fileno(), *owner)
        f.write(data)


def create(layout: Layout, role: str, *, rpm: int | None = None, tpm: int | None = None,
           max_live: int | None = None) -> tuple[str, str]:
    """Make a key with `role` and its own limits (None: the [server] default, 0: none); return (id, key).
    The key is shown once and never stored."""
    if role not in ROLES:
        raise ApiKeyError(f"The role {role!r} does not exist.", f"Use one of: {', '.join(ROLES)}.")
    for name, value in (("rpm", rpm), ("tpm", tpm), ("max-live", max_live)):
        if value is not None and value < 0:
            raise ApiKeyError(f"--{name} is {value}; a limit must be 0 (none) or more.")
    records = _read(layout)
    taken = {r.id for r in records}
    key_id = secrets.token_hex(4)
    while key_id in taken:
        key_id = secrets.token_hex(4)
    key = f"{PREFIX}-{key_id}-{secrets.token_urlsafe(32)}"
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    _write(layout, [*records, KeyRecord(key_id, role, _hash(key), now, None, rpm, tpm, max_live)])
    audit.append(layout, {"event": "key_created", "key_id": key_id, "role": role, "rpm": rpm, "tpm": tpm, "max_live": max_live})
    return key_id, key


def list_keys(layout: Layout) -> list[KeyRecord]:
    return _read(layout)


def revoke(layout: Layout, key_id: str) -> KeyRecord:
    records = _read(layout)
    for i, r in enumerate(records):
        if r.id == key_id:
            if r.active:
                records[i] = replace(r, revoked_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
                _write(layout, records)
                audit.append(layout, {"event": "key_revoked", "key_id": r.id, "role": r.role})
            return records[i]
    raise ApiKeyError(f"There is no key with id {key_id!r}.", "Run `appliance keys list` to see the key ids.")


def _match(records: list[KeyRecord], presented: str) -> KeyRecord | None:
    parts = presented.split("-", 2)
    if len(parts) != 3 or parts[0] != PREFIX:
        return None
    digest = _hash(presented)
    for r in records:
        if r.id == parts[1] and r.active and hmac.compare_digest(r.hash, digest):
            return r
    return None


def verify(layout: Layout, presented_key: str) -> KeyRecord | None:
    """The active record the key belongs to, or None."""
    return _match(_read(layout), presented_key)


class KeyCache:
    """verify() for the server: re-reads the key file only when it changed, so revocations apply at once."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._records: list[KeyRecord] = []

    def verify(self, presented_key: str) -> KeyRecord | None:
        try:
            st = os.stat(keys_file(self.layout))
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = (0, 0, 0)
        with self._lock:
            if stamp != self._stamp:
                self._records = _read(self.layout) if stamp != (0, 0, 0) else []
                self._stamp = stamp
            records = self._records
        return _match(records, presented_key)
