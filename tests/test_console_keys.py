"""Moving between the console's screens with the keys it shows, from every screen and every focus.

What a person can expect (the design these tests hold the console to):
- the n-th screen of the app's list is the digit n while no input has the focus; F<n> and alt+<n>
  work everywhere, also while typing in an input (alt+<n> also as a terminal sends it, ESC <n>);
- in an input, digits and q are text (a path or a question keeps them);
- Escape in an input leaves the input; Escape again goes back (an install step, else the screen before);
- q quits while not typing, ctrl+q always;
- the nav bar and the footer show the keys that work in the state they are in.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console
from textual.widgets import Input

from appliance.console.app import ConsoleApp
from appliance.console.sources.recorded import recorded_sources
from appliance.console.widgets.nav import alt_keys

FIX = Path(__file__).parent / "fixtures" / "console"
SIZE = (100, 30)  # wide enough for the nav bar's full form, as in the tmux tour
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def until(pilot, cond: Callable[[], object], what: str, tries: int = 200) -> None:
    for _ in range(tries):
        if cond():
            return
        await pilot.pause(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def make_app(tmp_path: Path, first: str = "dashboard") -> ConsoleApp:
    sources = recorded_sources(FIX, tmp_path / "root")
    (tmp_path / "no-sticks").mkdir()
    sources.bundle_roots = (tmp_path / "no-sticks",)  # no bundle found: Install puts the focus in its path input
    return ConsoleApp(sources, first=first)


def painted(app: ConsoleApp) -> list[str]:
    """The screen as a person sees it, line by line."""
    w, h = app.size
    console = Console(width=w, height=h, file=io.StringIO(), force_terminal=True, record=True, legacy_windows=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text().splitlines()


def nav_keys(app: ConsoleApp) -> dict[str, str]:
    """The nav bar as painted: label -> the key it shows for that screen."""
    return {label: key for key, label in re.findall(r"(F?\d) (\w+)", painted(app)[0])}


def footer(app: ConsoleApp) -> str:
    return painted(app)[-1]


def inputs(app: ConsoleApp) -> list[Input]:
    """The inputs a person can reach on this screen now (Tab reaches them)."""
    return [w for w in app.screen.focus_chain if isinstance(w, Input)]


async def press_as_shown(pilot, app: ConsoleApp, label: str) -> None:
    key = nav_keys(app)[label]
    await pilot.press(key.lower())


@pytest.mark.slow
async def test_every_screen_key_works_from_every_screen_in_every_focus(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    pages = ConsoleApp.PAGES
    async with app.run_test(size=SIZE) as pilot:
        for source in pages:
            for n, target in enumerate(pages, 1):
                if target is source:
                    continue
                for focus in ("input", "none"):
                    app.switch_mode(source.mode)
                    await until(pilot, lambda s=source: app.current_mode == s.mode and app.screen.is_current, source.mode)
                    await pilot.pause()  # the screen's resume restores its focus first
                    reachable = inputs(app)
                    if focus == "input" and not reachable:
                        continue
                    want = reachable[0] if focus == "input" else None
                    app.screen.set_focus(want)
                    await until(pilot, lambda w=want: app.screen.focused is w, f"the focus on {want}")
                    expected = f"F{n}" if focus == "input" else str(n)
                    await until(pilot, lambda e=expected, t=target: nav_keys(app).get(t.label) == e,
                                f"{expected} {target.label} in the nav bar of {source.mode} ({focus}): {painted(app)[0]}")
                    assert set(nav_keys(app)) == {p.label for p in pages}, painted(app)[0]
                    await press_as_shown(pilot, app, target.label)
                    await until(pilot, lambda t=target: app.current_mode == t.mode, f"{target.mode} from {source.mode} ({focus})")
                    # alt+<n> as well, from the same input: as alt+<n>, and as Textual reads ESC <n> (tmux, xterm)
                    for alt in alt_keys(n) if focus == "input" else ():
                        app.switch_mode(source.mode)
                        await until(pilot, lambda s=source: app.current_mode == s.mode, source.mode)
                        await pilot.pause()
                        app.screen.set_focus(inputs(app)[0])
                        await pilot.press(alt)
                        await until(pilot, lambda t=target: app.current_mode == t.mode, f"{alt} from {source.mode}'s input")


async def test_in_an_input_digits_and_q_are_text_and_escape_leaves_it(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        await until(pilot, lambda: app.current_mode == "install", "Install")
        path = app.screen.query_one("#bundle-path", Input)
        await until(pilot, lambda: app.screen.focused is path, "the focus in the bundle path")
        assert "esc Leave input" in footer(app) and "^q Quit" in footer(app) and " q Quit" not in footer(app)
        await pilot.press(*"/media/usb3/q1")
        assert path.value == "/media/usb3/q1" and app.current_mode == "install" and app.is_running
        await pilot.press("f3")  # F3 leaves while typing; the text stays where it was
        await until(pilot, lambda: app.current_mode == "training", "Training")
        await pilot.press("2")
        await until(pilot, lambda: app.current_mode == "install", "Install again")
        assert path.value == "/media/usb3/q1"
        await pilot.press("escape")  # out of the input, still on Install
        assert app.screen.focused is None and app.current_mode == "install"
        assert nav_keys(app)["Training"] == "3"
        assert "esc Back" in footer(app) and " q Quit" in footer(app)
        await pilot.press("escape")  # and back to the screen shown before
        await until(pilot, lambda: app.current_mode == "training", "back to Training")
        await pilot.press("escape")
        await until(pilot, lambda: app.current_mode == "install", "back to Install")
        await pilot.press("escape")
        await until(pilot, lambda: app.current_mode == "dashboard", "back to the Dashboard")
        assert "esc" not in footer(app)  # nothing before the first screen: Escape is not offered


async def test_escape_leaves_the_playground_prompt_and_the_log_filter(tmp_path: Path) -> None:
    app = make_app(tmp_path, first="playground")
    async with app.run_test(size=SIZE) as pilot:
        prompt = app.screen.query_one("#prompt", Input)
        await until(pilot, lambda: app.screen.focused is prompt, "the prompt's focus")
        await pilot.press(*"1 or 2?")
        assert prompt.value == "1 or 2?" and nav_keys(app)["Logs"] == "F6"
        await pilot.press("escape", "6")
        await until(pilot, lambda: app.current_mode == "logs", "Logs by its digit after Esc")
        await pilot.press("slash", *"q5")
        assert app.screen.query_one("#filter", Input).value == "q5" and app.current_mode == "logs"
        assert "esc Clear filter" in footer(app)
        await pilot.press("escape")  # the filter is cleared and left
        assert app.screen.query_one("#filter", Input).value == "" and nav_keys(app)["Keys"] == "5"
        assert "esc Back" in footer(app)
        await pilot.press("escape")
        await until(pilot, lambda: app.current_mode == "playground", "back to the Playground")


async def test_escape_goes_back_an_install_step_before_it_leaves_install(tmp_path: Path) -> None:
    app = make_app(tmp_path, first="install")
    app.sources.bundle_roots = (FIX / "usb",)  # a bundle whose check fails: the screen stays on its verify step
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        table = screen.query_one("#bundles")
        await until(pilot, lambda: table.row_count == 1, "the bundle list")
        table.focus()
        await pilot.press("enter")
        await until(pilot, lambda: any(n.severity == "error" for n in app._notifications), "the check's error")
        switcher = screen.query_one("ContentSwitcher")
        assert str(switcher.current) == "verify" and screen.focused is None  # not a hidden input of the pick step
        await pilot.press("escape")
        assert str(switcher.current) == "pick" and app.current_mode == "install"


async def test_q_quits_when_not_typing(tmp_path: Path) -> None:
    app = make_app(tmp_path, first="logs")
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "q Quit" in footer(app), "the footer")
        await pilot.press("q")
        await until(pilot, lambda: app.return_code == 0, "the console to quit")  # App.exit() sets it


async def test_screen_keys_wait_while_a_dialog_asks(tmp_path: Path) -> None:
    app = make_app(tmp_path, first="training")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("t")
        await until(pilot, lambda: type(app.screen).__name__ == "ConfirmDialog", "the question")
        await pilot.press("f1", "1", "alt+1")
        assert type(app.screen).__name__ == "ConfirmDialog" and app.current_mode == "training"
        await pilot.press("n")
        await pilot.press("1")
        await until(pilot, lambda: app.current_mode == "dashboard", "the Dashboard once answered")


@pytest.mark.parametrize("width", [60, 80, 100])
@pytest.mark.parametrize("typing", [False, True])
def test_the_nav_bar_fits_its_width_with_every_key(width: int, typing: bool) -> None:
    from appliance.console.widgets.nav import nav_text

    pages = ConsoleApp.PAGES
    bar = nav_text(pages, "keys", typing, width).plain
    assert len(bar) <= width, bar
    keys = re.findall(r"(F?\d) ?[A-Z]", bar)  # each key is followed by its label, with or without a space
    assert keys == [f"F{n}" if typing else str(n) for n in range(1, len(pages) + 1)], bar
    if width >= 100:
        assert all(f"{'F' if typing else ''}{n} {p.label}" in bar for n, p in enumerate(pages, 1)), bar
