"""What every screen shares: the nav bar, the footer, access to the sources, and the one place a
failed worker becomes a notification."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from textual.screen import Screen
from textual.worker import Worker, WorkerState

if TYPE_CHECKING:
    from appliance.console.sources.context import Sources


class ConsoleScreen(Screen[None]):
    NAV = ""

    @property
    def sources(self) -> Sources:
        return self.app.sources  # type: ignore[attr-defined, no-any-return]

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR and event.worker.error is not None:
            self.app.show_error(event.worker.error)  # type: ignore[attr-defined]

    def can_step_back(self) -> bool:
        """A screen of several steps (Install) goes back a step on Escape before the app goes back a screen."""
        return False

    def step_back(self) -> None:
        """The step before; called only when can_step_back() says there is one."""

    def busy(self, group: str) -> bool:
        """A poll still running (e.g. a slow server) is not started again on top of itself."""
        return any(w.group == group and w.state in (WorkerState.PENDING, WorkerState.RUNNING) for w in self.workers)

    def flush_notes(self) -> None:
        notes: list[Any] = self.sources.notes
        while notes:
            self.notify(str(notes.pop(0)), markup=False, timeout=10)
