"""SVG snapshots of every screen at 80x24 with recorded data (pytest-textual-snapshot).

Update after an intended change with `pytest tests/test_console_snapshots.py --snapshot-update`
and look at the SVGs in tests/__snapshots__/ before committing them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.console.app import ConsoleApp
from appliance.console.sources.recorded import recorded_sources

FIX = Path(__file__).parent / "fixtures" / "console"


def wait_for(cond: Callable[[ConsoleApp], bool], typed: str = "") -> Callable:
    async def run_before(pilot) -> None:
        for inp in pilot.app.screen.query("Input"):
            inp.cursor_blink = False
        if typed:
            await pilot.press(*typed, "enter")
        for _ in range(200):
            if cond(pilot.app):
                break
            await pilot.pause(0.05)
        else:
            raise AssertionError("the screen never showed its data")
        await pilot.pause(0.2)

    return run_before


def painted(app: ConsoleApp, selector: str) -> str:
    from textual.geometry import Region

    w = app.screen.query_one(selector)
    return "\n".join(s.text for s in w.render_lines(Region(0, 0, w.outer_size.width, w.outer_size.height)))


def rows(n: int, selector: str = "DataTable") -> Callable[[ConsoleApp], bool]:
    return lambda app: app.screen.query_one(selector).row_count == n


SCREENS = {
    "dashboard": lambda app: "4.50" in painted(app, "#server") and "active" in painted(app, "#units"),
    "install": rows(1, "#bundles"),
    "training": lambda app: rows(3)(app) and "kept" in painted(app, "#gate"),
    "adapters": rows(3),
    "keys": rows(3),
    "logs": lambda app: app.screen.query_one("#log").line_count == 8,
    "playground": lambda app: app.screen.answer is None and len(app.screen.query(".msg")) == 2,
}
TYPED = {"playground": "how do I undo a promotion?"}


@pytest.mark.parametrize("screen", list(SCREENS))
def test_screen_snapshot(screen: str, snap_compare, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(FIX)  # the install screen lists the recorded stick as `usb/...`
    sources = recorded_sources(FIX, tmp_path / "root")
    sources.bundle_roots = (FIX / "usb",)
    assert snap_compare(ConsoleApp(sources, first=screen), terminal_size=(80, 24), run_before=wait_for(SCREENS[screen], TYPED.get(screen, "")))


def test_server_down_snapshot(snap_compare, tmp_path: Path) -> None:
    sources = recorded_sources(FIX, tmp_path / "root", server_down=True)
    assert snap_compare(ConsoleApp(sources), terminal_size=(80, 24),
                        run_before=wait_for(lambda app: "down" in painted(app, "#server") and "active" in painted(app, "#units")))
