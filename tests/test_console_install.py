"""The install screen end to end: the demo bundle into a temporary root, driven by keys only."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.console.app import ConsoleApp
from appliance.console.sources.context import Sources
from appliance.console.sources.recorded import recorded_sources
from tests.demo_fixtures import DemoBundle

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


async def choose_the_bundle(pilot, app: ConsoleApp) -> None:
    """Wait for the one bundle in the list, then pick it as a person would: focus and Enter."""
    table = app.screen.query_one("#bundles")
    await until(pilot, lambda: table.row_count == 1, "the bundle list")
    table.focus()
    await pilot.press("enter")


def dialog(app: ConsoleApp) -> str | None:
    return getattr(app.screen, "question", None) if type(app.screen).__name__ == "ConfirmDialog" else None


@pytest.mark.slow
async def test_install_screen_installs_the_demo_bundle(demo_bundle: DemoBundle, tmp_path: Path) -> None:
    from installer.system.release import current_release

    sources = Sources.real(tmp_path / "root")
    assert not sources.systemd  # a temporary root: no units are started
    sources.bundle_roots = (demo_bundle.dir.parent,)
    sources.api_key = "unused"  # the dashboard is not under test here
    app = ConsoleApp(sources, first="install")
    async with app.run_test(size=(80, 24)) as pilot:
        await choose_the_bundle(pilot, app)
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
        await choose_the_bundle(pilot, app)
        await until(pilot, lambda: any(n.severity == "error" for n in app._notifications), "the error")
        assert app.is_running
        await pilot.press("escape")
        assert str(app.screen.query_one("ContentSwitcher").current) == "pick"


async def test_install_screen_plans_on_a_recorded_machine_and_every_no_changes_nothing(slim, tmp_path: Path) -> None:
    from installer.hardware.machine import load_machine
    from installer.planning.planner import plan
    from installer.planning.tiers import models_of, parse_tiers

    machine = Path(__file__).parent / "fixtures" / "machines" / "4x-a100-80g.json"
    sources = Sources.real(tmp_path / "fresh", machine=machine)
    sources.bundle_roots = (slim.dir.parent,)
    sources.api_key = "unused"
    app = ConsoleApp(sources, first="install")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await choose_the_bundle(pilot, app)
        await until(pilot, lambda: dialog(app) is not None, "the fingerprint question")
        await pilot.press("n")  # not the vendor's key: nothing happens, the reason is shown
        await until(pilot, lambda: any("not confirmed" in str(n.message) for n in app._notifications), "the refusal")
        await pilot.press("escape")  # back to the bundle list
        await until(pilot, lambda: str(screen.query_one("ContentSwitcher").current) == "pick", "the bundle list again")
        screen.query_one("#bundles").focus()
        await pilot.press("enter")
        await until(pilot, lambda: dialog(app) is not None, "the fingerprint question again")
        await pilot.press("y")
        await until(pilot, lambda: str(screen.query_one("ContentSwitcher").current) == "plan", "the tier table")
        m = slim.manifest()
        expected = plan(load_machine(machine), parse_tiers(m["tiers"], models_of(screen.checked.manifest.models)))
        tiers = screen.query_one("#tiers")
        assert tiers.row_count == len(expected.tiers)
        for t, v in zip(expected.tiers, expected.verdicts, strict=True):
            assert str(tiers.get_cell(t.name, "verdict")) == v.verdict  # the planner `appliance hw` uses
        assert screen.rows and all(r.bar.progress == 1.0 for r in screen.rows.values())  # every file verified
        screen.query_one("#go").press()
        await until(pilot, lambda: any("key file or the passphrase" in str(n.message) for n in app._notifications), "the key prompt")
        screen.query_one("#key-file").value = str(slim.keys / "model.key")
        screen.query_one("#go").press()
        await until(pilot, lambda: dialog(app) is not None and dialog(app).startswith("Install "), "the installer's question")
        await pilot.press("n")
        await until(pilot, lambda: not screen.running, "the end of the install")
        assert "Cancelled; nothing was changed." in str(screen.query_one("#install-result").render())
        assert not (tmp_path / "fresh" / "opt").exists()


async def test_quitting_while_the_installer_asks_does_not_hang(slim, tmp_path: Path) -> None:
    sources = Sources.real(tmp_path / "fresh", machine=Path(__file__).parent / "fixtures" / "machines" / "4x-a100-80g.json")
    sources.bundle_roots = (slim.dir.parent,)
    app = ConsoleApp(sources, first="install")
    async with app.run_test(size=(80, 24)) as pilot:
        await choose_the_bundle(pilot, app)
        await until(pilot, lambda: dialog(app) is not None, "the fingerprint question")
        app.exit()
    assert not (tmp_path / "fresh" / "etc").exists()  # nothing was pinned or written
