"""The install screen end to end: the demo bundle into a temporary root, driven by keys only."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.console.app import ConsoleApp
from appliance.console.sources.context import Sources
from appliance.console.sources.recorded import recorded_sources
from tests.demo_fixtures import DemoBundle, demo_bundle  # noqa: F401

FIX = Path(__file__).parent / "fixtures" / "console"
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def until(pilot, cond, what: str, seconds: float = 30.0) -> None:
    for _ in range(int(seconds / 0.1)):
        if cond():
            return
        await pilot.pause(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def dialog(app: ConsoleApp) -> str | None:
    return getattr(app.screen, "question", None) if type(app.screen).__name__ == "ConfirmDialog" else None


@pytest.mark.slow
async def test_install_screen_installs_the_demo_bundle(demo_bundle: DemoBundle, tmp_path: Path) -> None:  # noqa: F811
    from installer.release import current_release

    sources = Sources.real(tmp_path / "root")
    assert not sources.systemd  # a temporary root: no units are started
    sources.bundle_roots = (demo_bundle.dir.parent,)
    sources.api_key = "unused"  # the dashboard is not under test here
    app = ConsoleApp(sources, first="install")
    async with app.run_test(size=(80, 24)) as pilot:
        table = app.screen.query_one("#bundles")
        await until(pilot, lambda: table.row_count == 1, "the bundle list")
        table.focus()
        await pilot.press("enter")
        # First install: the installer asks whether the vendor key's fingerprint is the one in the vendor's letter.
        await until(pilot, lambda: dialog(app) is not None, "the fingerprint question", 120)
        assert "SHA256:" in dialog(app)
        await pilot.press("y")
        await until(pilot, lambda: type(app.screen).__name__ == "InstallScreen"
                    and str(app.screen.query_one("ContentSwitcher").current) == "plan", "the tier table", 300)
        screen = app.screen
        assert screen.query_one("#tiers").row_count >= 1
        assert screen.query_one("#key-file").value == str((demo_bundle.keys / "model.key").resolve())
        screen.query_one("#go").press()
        await until(pilot, lambda: dialog(app) is not None, "the installer's confirmation", 120)
        assert dialog(app).startswith("Install ")
        await pilot.press("y")
        await until(pilot, lambda: not screen.running, "the install", 900)
        result = "\n".join(s.text for s in screen.query_one("#install-result").render_lines(
            __import__("textual.geometry", fromlist=["Region"]).Region(0, 0, 78, 6)))
        assert "Installed" in result, result
        assert set(screen.rows) >= {"verify", "plan", "stage", "model", "config"}
    layout = sources.layout
    assert current_release(layout) is not None and layout.config_file.is_file()


async def test_a_bad_bundle_is_an_error_sentence_not_a_crash(tmp_path: Path) -> None:
    sources = recorded_sources(FIX, tmp_path / "root")
    sources.bundle_roots = (FIX / "usb",)  # a directory with a manifest that is not one
    app = ConsoleApp(sources, first="install")
    async with app.run_test(size=(80, 24)) as pilot:
        table = app.screen.query_one("#bundles")
        await until(pilot, lambda: table.row_count == 1, "the bundle list")
        table.focus()
        await pilot.press("enter")
        await until(pilot, lambda: any(n.severity == "error" for n in app._notifications), "the error")
        assert app.is_running
        await pilot.press("escape")
        assert str(app.screen.query_one("ContentSwitcher").current) == "pick"
