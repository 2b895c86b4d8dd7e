"""Logs: the units' journal followed live (or the audit log without systemd), filterable.

Every line is shown literally: Rich markup stays text, escape sequences become visible `\\xNN`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.widgets import Footer, Input, Log, Static

from appliance.console.screens.base import ConsoleScreen
from appliance.console.sources.journal import Files, Journal, log_source
from appliance.console.widgets.inputs import TextInput
from appliance.console.widgets.literal import literal, text
from appliance.console.widgets.nav import NavBar

KEEP = 5000
POLL_S = 1.0


@dataclass
class LogLines(Message):
    lines: list[str]


class LogsScreen(ConsoleScreen):
    NAV = "logs"
    # Escape in the filter clears it and leaves it; elsewhere it is the app's Back.
    BINDINGS = [Binding("slash", "focus_filter", "Filter"), Binding("escape", "clear_filter", "Clear filter"),
                Binding("f", "toggle_follow", "Follow")]

    def __init__(self) -> None:
        super().__init__()
        self.lines: deque[str] = deque(maxlen=KEEP)
        self.follow = True
        self.source: Journal | Files | None = None

    def compose(self) -> ComposeResult:
        yield NavBar(self.NAV)
        yield Static(id="log-title", classes="hint")
        yield TextInput(placeholder="filter (/): show only lines containing this text", id="filter")
        yield Log(id="log", max_lines=KEEP, auto_scroll=True)
        yield Footer()

    def on_mount(self) -> None:
        s = self.sources
        self.source = source = log_source(s.layout, s.runner, s.systemd)
        self.query_one("#log-title", Static).update(text(source.title, "dim"))
        self.query_one(Log).focus()
        self.timer = self.set_interval(POLL_S, self.poll)
        self.poll()

    def on_screen_suspend(self) -> None:
        self.timer.pause()

    def on_screen_resume(self) -> None:
        self.timer.resume()

    def poll(self) -> None:
        if not self.busy("poll"):
            self.read_lines()

    @work(thread=True, exclusive=True, exit_on_error=False, group="poll")
    def read_lines(self) -> None:
        assert self.source is not None
        lines = self.source.poll()
        if lines:
            self.post_message(LogLines(lines))

    def _match(self, line: str) -> bool:
        f = self.query_one("#filter", Input).value
        return not f or f.lower() in line.lower()

    def on_log_lines(self, m: LogLines) -> None:
        # A carriage return redraws the line in a terminal (progress bars): show what the terminal would.
        shown = [literal(ln.rstrip("\r").rsplit("\r", 1)[-1]) for ln in m.lines]
        self.lines.extend(shown)
        log = self.query_one(Log)
        log.auto_scroll = self.follow
        log.write_lines([ln for ln in shown if self._match(ln)])

    def on_input_changed(self, event: Input.Changed) -> None:
        log = self.query_one(Log)
        log.clear()
        log.write_lines([ln for ln in self.lines if self._match(ln)])

    def action_focus_filter(self) -> None:
        self.query_one("#filter", Input).focus()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "clear_filter":
            return self.focused is self.query_one("#filter", Input)
        return True

    def action_clear_filter(self) -> None:
        self.query_one("#filter", Input).value = ""
        self.query_one(Log).focus()

    def action_toggle_follow(self) -> None:
        self.follow = not self.follow
        self.query_one(Log).auto_scroll = self.follow
        self.notify("Following new lines." if self.follow else "Paused following; new lines still arrive.", markup=False)
