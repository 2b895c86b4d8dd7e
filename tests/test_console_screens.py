"""Pilot tests: each screen's main action on recorded data, and errors that become notifications."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance import adapters, apikeys
from appliance.console.app import ConsoleApp
from appliance.console.sources.recorded import recorded_sources
from appliance.paths import UNITS

FIX = Path(__file__).parent / "fixtures" / "console"
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def until(pilot, cond: Callable[[], bool], what: str, tries: int = 100) -> None:
    for _ in range(tries):
        if cond():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def make_app(tmp_path: Path, first: str = "dashboard", **kw) -> ConsoleApp:
    return ConsoleApp(recorded_sources(FIX, tmp_path / "root", **kw), first=first)


def shown(app: ConsoleApp, selector: str) -> str:
    """The text a widget paints now."""
    from textual.geometry import Region

    w = app.screen.query_one(selector)
    return "\n".join(strip.text for strip in w.render_lines(Region(0, 0, w.outer_size.width, w.outer_size.height)))


def notes(app: ConsoleApp) -> list[str]:
    return [str(n.message) for n in app._notifications]


async def test_dashboard_shows_units_metrics_and_host(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: "active" in shown(app, "#units") and "4.50" in shown(app, "#server"), "two scrapes")
        server = shown(app, "#server")
        assert "ready" in server and "4.50" in server and "792.0" in server
        assert "NVIDIA L4" in shown(app, "#host")
        assert "20261121-030009" in shown(app, "#summary")
        units = shown(app, "#units")
        for unit in UNITS:  # named as systemctl and journalctl take them
            assert re.search(rf"│ {re.escape(unit)} +(active|inactive)", units), units


async def test_dashboard_shows_a_down_server_as_down(tmp_path: Path) -> None:
    app = make_app(tmp_path, server_down=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.screen.loaded, "a sample")
        assert "down" in shown(app, "#server")
        assert app.is_running


async def test_failed_unit_shows_start_limit_hit(tmp_path: Path) -> None:
    sources = recorded_sources(FIX, tmp_path / "root")
    sources.runner.replies[("systemctl", "is-active", "appliance-server.service")] = (3, "failed\n")
    sources.runner.replies[("systemctl", "show", "-p", "Result", "--value", "appliance-server.service")] = (0, "start-limit-hit\n")
    app = ConsoleApp(sources)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: "start-limit-hit" in shown(app, "#units"), "unit state")


async def test_keys_create_shows_the_key_once_and_revoke_asks_first(tmp_path: Path) -> None:
    app = make_app(tmp_path, first="keys")
    layout = app.sources.layout
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.screen.query_one("DataTable").row_count == 3, "the key list")
        await pilot.press("u")
        await until(pilot, lambda: type(app.screen).__name__ == "SecretDialog", "the new key")
        key = app.screen.secret
        record = apikeys.verify(layout, key)
        assert record is not None and record.role == "user"
        assert key not in (layout.etc / "api-keys.json").read_text()  # only its hash is stored
        await pilot.press("c")
        await pilot.press("escape")
        keys_screen = app.screen
        await until(pilot, lambda: keys_screen.query_one("DataTable").row_count == 4, "the list with the new key")
        keys_screen.query_one("DataTable").move_cursor(row=3)
        await pilot.press("r")
        await until(pilot, lambda: type(app.screen).__name__ == "ConfirmDialog", "the confirmation")
        await pilot.press("n")
        assert apikeys.verify(layout, key) is not None  # "no" changes nothing
        await pilot.press("r")
        await until(pilot, lambda: type(app.screen).__name__ == "ConfirmDialog", "the confirmation")
        await pilot.press("y")
        await until(pilot, lambda: apikeys.verify(layout, key) is None, "the revocation")


async def test_adapters_promote_and_roll_back_after_confirmation(tmp_path: Path) -> None:
    app = make_app(tmp_path, first="adapters")
    layout = app.sources.layout
    transport = app.sources.transport
    async with app.run_test(size=(80, 24)) as pilot:
        table = app.screen.query_one("DataTable")
        await until(pilot, lambda: table.row_count == 3, "the adapter list")
        assert adapters.active_id(layout) == "20261121-030009"
        table.move_cursor(row=0)  # newest: 20261122-030011, kept unpromoted by the gate
        await pilot.press("p")
        await until(pilot, lambda: type(app.screen).__name__ == "ConfirmDialog", "the confirmation")
        await pilot.press("y")
        await until(pilot, lambda: adapters.active_id(layout) == "20261122-030011", "the promotion")
        await until(pilot, lambda: any(p == "/admin/adapters/reload" for _, p, _ in transport.requests), "the reload request")
        await pilot.press("b")
        await until(pilot, lambda: type(app.screen).__name__ == "ConfirmDialog", "the confirmation")
        await pilot.press("y")
        await until(pilot, lambda: adapters.active_id(layout) == "20261121-030009", "the rollback")
        await until(pilot, lambda: any("Rolled back to 20261121-030009" in n for n in notes(app)), "the notification")


async def test_training_lists_runs_and_train_now_starts_the_unit(tmp_path: Path) -> None:
    app = make_app(tmp_path, first="training")
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.screen.query_one("DataTable").row_count == 3, "the runs")
        await until(pilot, lambda: "not 2.0% below" in shown(app, "#gate"), "the gate reason")
        await pilot.press("t")
        await until(pilot, lambda: type(app.screen).__name__ == "ConfirmDialog", "the confirmation")
        await pilot.press("y")
        runner = app.sources.runner
        await until(pilot, lambda: ["systemctl", "start", "--no-block", "appliance-trainer.service"] in runner.commands, "systemctl start")


async def test_logs_are_literal_and_filterable(tmp_path: Path) -> None:
    app = make_app(tmp_path, first="logs")
    async with app.run_test(size=(80, 24)) as pilot:
        log = app.screen.query_one("#log")
        await until(pilot, lambda: log.line_count == 8, "the journal")
        assert "loading: 100%|##########| 272/272" in log.lines[2] and "0/272" not in log.lines[2]  # \r redraws
        last = log.lines[-1]
        assert "[bold red]not markup[/]" in last and "\\x1b[31m" in last and "\x1b" not in last
        await pilot.press("slash")
        await pilot.press(*"gate")
        await until(pilot, lambda: log.line_count == 1, "the filter")
        assert "kept unpromoted" in log.lines[0]
        await pilot.press("escape")
        await until(pilot, lambda: log.line_count == 8, "the cleared filter")


async def test_playground_streams_with_the_adapter_and_without(tmp_path: Path) -> None:
    app = make_app(tmp_path, first="playground")
    transport = app.sources.transport
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press(*"how do I undo a promotion?", "enter")
        def chat() -> str:
            return "\n".join(str(m.render()) for m in app.screen.query(".msg"))

        await until(pilot, lambda: app.screen.answer is None and "go back" in chat(), "the answer")
        assert "model: Run `appliance adapters rollback` [b]to go back[/b]." in chat()  # markup in model output stays text
        bodies = [json.loads(b) for m, p, b in transport.requests if p == "/v1/chat/completions"]
        assert bodies[-1]["model"] == "smollm2-135m-instruct-q4_1:20261121-030009" and bodies[-1]["stream"] is True
        assert chat().startswith("you: how do I undo a promotion?")
        await pilot.press("ctrl+t")
        await pilot.press(*"again", "enter")
        await until(pilot, lambda: len([1 for m, p, b in transport.requests if p == "/v1/chat/completions"]) == 2, "the second request")
        bodies = [json.loads(b) for m, p, b in transport.requests if p == "/v1/chat/completions"]
        assert bodies[-1]["model"] == "smollm2-135m-instruct-q4_1"
        assert [m["role"] for m in bodies[-1]["messages"]] == ["user", "assistant", "user"]


async def test_an_error_in_an_action_is_a_notification_not_a_crash(tmp_path: Path) -> None:
    app = make_app(tmp_path, first="playground", server_down=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press(*"hello", "enter")
        await until(pilot, lambda: any("does not answer" in n for n in notes(app)), "the error notification")
        assert app.is_running


async def test_a_damaged_state_file_is_shown_on_the_dashboard(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    app.sources.layout.state_file.parent.mkdir(parents=True, exist_ok=True)
    app.sources.layout.state_file.write_text("{damaged")
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: "cannot be read" in shown(app, "#summary"), "the problem line")
        assert app.is_running and not any("cannot be read" in n for n in notes(app))


async def test_dashboard_restarts_the_server_through_systemctl_after_confirmation(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    runner = app.sources.runner
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("s")
        await until(pilot, lambda: type(app.screen).__name__ == "ConfirmDialog", "the confirmation")
        await pilot.press("y")
        await until(pilot, lambda: ["systemctl", "restart", "appliance-server.service"] in runner.commands, "systemctl restart")
