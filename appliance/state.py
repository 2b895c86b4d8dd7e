"""state.json: installed releases, the highest bundle sequence seen and the clock floor."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from appliance.errors import StateError
from appliance.paths import Layout


def load_install_state(layout: Layout) -> dict[str, Any]:
    """The recorded state, or an empty one on a host where nothing was installed yet."""
    try:
        data = json.loads(layout.state_file.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise StateError(
            f"The state file {layout.state_file} cannot be read: {e}.",
            "Restore it from backup; it records which bundle sequence is installed.",
        ) from None
    if not isinstance(data, dict):
        raise StateError(f"The state file {layout.state_file} is not a JSON object.")
    return data


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
    """Replace state.json atomically (the caller holds the install lock)."""
    from appliance.atomic import atomic_write_json

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
