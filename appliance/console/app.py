"""The console app: seven screens (Textual modes, each created when first shown), one error path."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from textual.app import App
from textual.binding import Binding, BindingType
from textual.screen import Screen

from appliance.console.sources.context import Sources
from appliance.console.widgets.nav import SCREENS


def _dashboard() -> Screen[Any]:
    from appliance.console.screens.dashboard import DashboardScreen

    return DashboardScreen()


def _install() -> Screen[Any]:
    from appliance.console.screens.install import InstallScreen

    return InstallScreen()


def _training() -> Screen[Any]:
    from appliance.console.screens.training import TrainingScreen

    return TrainingScreen()


def _adapters() -> Screen[Any]:
    from appliance.console.screens.adapters import AdaptersScreen

    return AdaptersScreen()


def _keys() -> Screen[Any]:
    from appliance.console.screens.keys import KeysScreen

    return KeysScreen()


def _logs() -> Screen[Any]:
    from appliance.console.screens.logs import LogsScreen

    return LogsScreen()


def _playground() -> Screen[Any]:
    from appliance.console.screens.playground import PlaygroundScreen

    return PlaygroundScreen()


class ConsoleApp(App[None]):
    CSS_PATH = Path(__file__).with_name("app.tcss")  # absolute: subclasses elsewhere (bench, tests) keep the style
    TITLE = "appliance console"
    # Screens import their widgets (plotext, DataTable, ...) only when first shown: a fast first paint.
    MODES = {"dashboard": _dashboard, "install": _install, "training": _training, "adapters": _adapters,
             "keys": _keys, "logs": _logs, "playground": _playground}
    BINDINGS: ClassVar[list[BindingType]] = [
        *(Binding(key, f"switch_mode('{mode}')", label, show=False) for key, mode, label in SCREENS),
        # F1..F7 work even while typing in an input (digits then go into the input).
        *(Binding(f"f{key}", f"switch_mode('{mode}')", label, show=False, priority=True) for key, mode, label in SCREENS),
        Binding("q", "quit", "Quit"), Binding("ctrl+c", "quit", "Quit", show=False, priority=True)]

    def __init__(self, sources: Sources, first: str = "dashboard") -> None:
        super().__init__()
        self.sources = sources
        self.first = first

    def on_mount(self) -> None:
        self.switch_mode(self.first)

    def show_error(self, error: BaseException) -> None:
        """An error no screen shows in place: a notification with the message and its hint."""
        from appliance.console.widgets.errors import error_parts

        self.notify("\n".join(p for p in error_parts(error) if p), severity="error", timeout=10, markup=False)

    def on_unmount(self) -> None:
        self.sources.close()


def run(sources: Sources) -> None:
    ConsoleApp(sources).run()
