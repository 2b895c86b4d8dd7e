"""state.json: installed releases, the highest bundle sequence seen and the clock floor.

It lives in root's own directory (Layout.installer_state, root:root 0755), so the service user, who
owns /var/lib/appliance, can neither reset rollback protection nor block updates by editing it.
Releases before the move kept it at var/lib/appliance/state.json: that file is read only while the
new one does not exist yet (the first run after the upgrade), and even then its sequence and clock
floor never go below what root's own release records under /opt/appliance/releases say.
"""

from __future__ import annotations

import json
import os
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from appliance.errors import StateError
from appliance.nofollow import open_file, read_capped, why
from appliance.paths import Layout

MAX_STATE_BYTES = 16 << 20


def installer_dir(layout: Layout) -> Path:
    """Root's own directory, made 0755 when missing; an error unless only its owner (root) can change it."""
    d = layout.installer_state
    d.mkdir(mode=0o755, parents=True, exist_ok=True)
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise StateError(f"{d} must be a directory owned by root and writable by no one else; nothing was written there.",
                         f"Check who changed it; then `chown root:root {d} && chmod 755 {d}`, and run the command again.")
    return d


def _read(path: Path) -> dict[str, Any] | None:
    try:
        raw = read_capped(path, MAX_STATE_BYTES)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateError(f"The state file {path} cannot be read: {why(e)}.",
                         "Restore it from backup; it records which bundle sequence is installed.") from None
    if len(raw) > MAX_STATE_BYTES:
        raise StateError(f"The state file {path} is larger than {MAX_STATE_BYTES >> 20} MiB; it is not the installer's.",
                         "Restore it from backup; it records which bundle sequence is installed.")
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise StateError(f"The state file {path} cannot be read: {e}.",
                         "Restore it from backup; it records which bundle sequence is installed.") from None
    if not isinstance(data, dict):
        raise StateError(f"The state file {path} is not a JSON object.")
    return data


def _release_records(layout: Layout) -> dict[str, dict[str, Any]]:
    """What root's own release records (opt/appliance/releases/*/release.json) say was installed."""
    out: dict[str, dict[str, Any]] = {}
    try:
        names = sorted(os.listdir(layout.releases))
    except FileNotFoundError:
        return out
    for name in names:
        try:
            fd = open_file(layout.releases / name / "release.json")
        except OSError:
            continue
        with os.fdopen(fd, "rb") as f:
            try:
                info = json.loads(f.read(1 << 20))
                issued = datetime.fromisoformat(str(info["issued_at"]).replace("Z", "+00:00"))
                out[str(info["id"])] = {"version": str(info["version"]), "tier": str(info["tier"]),
                                        "sequence": int(info["sequence"]), "issued_at": issued}
            except (ValueError, KeyError, TypeError):
                continue
    return out


def _legacy_floor(legacy: dict[str, Any]) -> tuple[int, datetime | None]:
    try:
        return highest_sequence(legacy), time_floor(legacy)
    except StateError:
        return 0, None


def _migrated(layout: Layout, legacy: dict[str, Any]) -> dict[str, Any]:
    """State rebuilt from root's release records; the old service-owned file may only raise the floor."""
    records = _release_records(layout)
    seq, floor = _legacy_floor(legacy)
    issued = [r.pop("issued_at") for r in records.values()]
    out: dict[str, Any] = {"highest_sequence": max([seq] + [r["sequence"] for r in records.values()]), "releases": records}
    floors = [t for t in [floor, *issued] if t is not None]
    if floors:
        out["time_floor"] = max(floors).isoformat()
    return out


def load_install_state(layout: Layout) -> dict[str, Any]:
    """The recorded state, or an empty one on a host where nothing was installed yet."""
    state = _read(layout.state_file)
    if state is not None:
        return state
    legacy = _read(layout.legacy_state_file)
    if legacy is None and not layout.releases.is_dir():
        return {}
    return _migrated(layout, legacy or {})


def highest_sequence(state: dict[str, Any]) -> int:
    value = state.get("highest_sequence", 0)
    if not isinstance(value, int):
        raise StateError("The state file's highest_sequence is not an integer.")
    return value


def time_floor(state: dict[str, Any]) -> datetime | None:
    value = state.get("time_floor")
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value).astimezone(timezone.utc)
    except (TypeError, ValueError):
        raise StateError("The state file's time_floor is not a timestamp.") from None


def versions_at(state: dict[str, Any], sequence: int) -> frozenset[str]:
    """The versions installed here with bundle sequence `sequence`."""
    releases = state.get("releases") or {}
    return frozenset(str(r["version"]) for r in releases.values()
                     if isinstance(r, dict) and r.get("sequence") == sequence and "version" in r)


def save_install_state(layout: Layout, state: dict[str, Any]) -> None:
    """Replace state.json atomically in root's own directory (the caller holds the install lock)."""
    from appliance.atomic import atomic_write_json

    installer_dir(layout)
    atomic_write_json(layout.state_file, state, mode=0o644)


def with_release(state: dict[str, Any], *, release: str, sequence: int, issued_at: datetime,
                 action: str, at: datetime, info: dict[str, Any]) -> dict[str, Any]:
    """A new state recording that `release` is now current. Pure. Sequence and time floor only grow."""
    new = dict(state)
    new["highest_sequence"] = max(highest_sequence(state), sequence)
    floor = time_floor(state)
    new["time_floor"] = max(floor, issued_at).isoformat() if floor else issued_at.isoformat()
    releases = dict(state.get("releases") or {})
    releases[release] = {**releases.get(release, {}), **info, "sequence": sequence}
    new["releases"] = releases
    new["current"] = release
    new["last_install"] = {"action": action, "release": release, "at": at.isoformat()}
    return new
