"""The console app: its list of screens (Textual modes, each created when first shown), the keys that
move between them, and one error path.

Keys: the n-th screen is the digit n while no input has the focus, and F<n> or alt+<n> everywhere
(in an input a digit is text). Escape in an input leaves the input; Escape again goes back (a step
of the install, else the screen shown before). q quits while not typing, ctrl+q always.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import ClassVar

from textual.app import App
from textual.binding import Binding, BindingType

from appliance.console.screens.base import ConsoleScreen
from appliance.console.sources.context import Sources
from appliance.console.widgets.nav import Page, digit, screen_bindings, typing

# The console's one list of screens: their order gives their keys (widgets/nav.py).
PAGES: tuple[Page, ...] = (
    Page("dashboard", "Dashboard", "dashboard:DashboardScreen"),
    Page("install", "Install", "install:InstallScreen"),
    Page("training", "Training", "training:TrainingScreen"),
    Page("adapters", "Adapters", "adapters:AdaptersScreen"),
    Page("keys", "Keys", "keys:KeysScreen"),
    Page("logs", "Logs", "logs:LogsScreen"),
    Page("playground", "Playground", "playground:PlaygroundScreen"),
    Page("feedback", "Feedback", "feedback:FeedbackScreen"),
)


class ConsoleApp(App[None], inherit_bindings=False):  # App's ctrl+q and ctrl+c are below, after q (the footer shows the first)
    CSS_PATH = Path(__file__).with_name("app.tcss")  # absolute: subclasses elsewhere (bench, tests) keep the style
    TITLE = "appliance console"
    PAGES = PAGES
    MODES = {p.mode: p.load for p in PAGES}
    BINDINGS: ClassVar[list[BindingType]] = [
        *screen_bindings(PAGES),
        # Two meanings of Escape, one enabled at a time (check_action), so the footer names the one it does.
        Binding("escape", "leave_input", "Leave input"), Binding("escape", "go_back", "Back"),
        Binding("q", "quit", "Quit"), Binding("ctrl+q", "quit", "Quit", priority=True),  # the footer shows ^q while q is text
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True)]

    def __init__(self, sources: Sources, first: str = "dashboard") -> None:
        super().__init__()
        self.sources = sources
        self.first = first
        self.trail: deque[str] = deque(maxlen=50)  # the screens shown before, for Back

    def on_mount(self) -> None:
        self.switch_mode(self.first)

    def digit(self, mode: str) -> str:
        """The key that shows the screen `mode`, for hints ("press 3 then t")."""
        return digit(self.PAGES, mode)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "show":
            return not self.screen.is_modal  # a dialog is answered first
        if action == "leave_input":
            return typing(self.screen)
        if action == "go_back":
            screen = self.screen
            steps = isinstance(screen, ConsoleScreen) and screen.can_step_back()
            return not typing(screen) and (steps or bool(self.trail))
        return True

    def action_show(self, mode: str) -> None:
        if mode != self.current_mode:
            self.trail.append(self.current_mode)
            self.switch_mode(mode)

    def action_leave_input(self) -> None:
        self.screen.set_focus(None)  # digits and q are keys again

    def action_go_back(self) -> None:
        screen = self.screen
        if isinstance(screen, ConsoleScreen) and screen.can_step_back():
            screen.step_back()
            self.refresh_bindings()
        elif self.trail:
            self.switch_mode(self.trail.pop())

    def show_error(self, error: BaseException) -> None:
        """An error no screen shows in place: a notification with the message and its hint."""
        from appliance.console.widgets.errors import error_parts

        self.notify("\n".join(p for p in error_parts(error) if p), severity="error", timeout=10, markup=False)

    def on_unmount(self) -> None:
        self.sources.close()


def run(sources: Sources) -> None:
    ConsoleApp(sources).run()
