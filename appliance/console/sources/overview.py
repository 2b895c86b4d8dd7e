"""What is installed and how its units are: `appliance status` (installer.steps.lifecycle.status) plus the
active adapter, and for a failed unit the reason systemd gives (e.g. start-limit-hit)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appliance.paths import Layout


@dataclass(frozen=True)
class UnitRow:
    name: str
    state: str  # active, inactive, failed, start-limit-hit, not installed, ...
    detail: str = ""  # next timer run, enabled/disabled


@dataclass(frozen=True)
class Overview:
    release: str | None
    tier: str | None
    model: str | None
    backend: str | None
    adapter: str | None
    units: tuple[UnitRow, ...]
    problem: str | None = None


def _unit_row(runner: Any, name: str, u: dict[str, Any]) -> UnitRow:
    if not u.get("installed"):
        return UnitRow(name, "not installed")
    state = u.get("active") or ("installed" if u.get("enabled") is None else ("enabled" if u["enabled"] else "disabled"))
    if state == "failed":
        # `is-active` says only "failed"; Result says why (start-limit-hit, exit-code, watchdog, ...).
        result = runner.run(["systemctl", "show", "-p", "Result", "--value", name], check=False).stdout.strip()
        if result and result != "success":
            state = result if result == "start-limit-hit" else f"failed ({result})"
    detail = f"next {u['next']}" if u.get("next") and u["next"] not in ("n/a", "0") else ""
    if not detail and "active" not in u and u.get("enabled") is not None:
        detail = "systemd not running here"
    return UnitRow(name, state, detail)


def overview(layout: Layout, runner: Any, systemd: bool) -> Overview:
    from appliance.adapters import active_id
    from installer.steps.lifecycle import status

    s = status(layout, runner, systemd)
    cur = s.get("current")
    release = f"{cur['version']} (seq {cur['sequence']})" if cur else None
    model = s.get("model") or {}
    units = tuple(_unit_row(runner, name, u) for name, u in s["units"].items())
    return Overview(release, s.get("tier"), model.get("id"), model.get("backend"), active_id(layout), units, s.get("problem"))
