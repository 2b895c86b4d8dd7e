"""Feedback: the corrections `user` keys sent, held until an admin accepts (the trainer uses them from
its next run) or rejects them. Through the server's admin API, as `appliance feedback accept|reject`
does on the store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable, Footer, Static

from appliance.console.screens.base import ConsoleScreen
from appliance.console.widgets.nav import NavBar


@dataclass
class HeldLoaded(Message):
    items: list[dict[str, Any]]


def _one_line(text: Any, width: int) -> Text:
    flat = " ".join(str(text or "").split())
    return Text(flat if len(flat) <= width else flat[: width - 1] + "…")  # Text: model output is never markup


class FeedbackScreen(ConsoleScreen):
    NAV = "feedback"
    BINDINGS = [Binding("a", "decide(True)", "Accept"), Binding("x", "decide(False)", "Reject"),
                Binding("ctrl+r", "reload", "Reload")]

    def compose(self) -> ComposeResult:
        yield NavBar(self.NAV)
        yield Static(Text("Corrections from user keys wait here: accepted ones train the next adapter, rejected ones never do."),
                      classes="hint")
        yield DataTable(id="held", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for label, width in [("id", 6), ("key", 8), ("question", 30), ("correction", 30)]:
            table.add_column(label, width=width)

    def on_screen_resume(self) -> None:
        self.action_reload()

    @work(thread=True, exclusive=True, exit_on_error=False, group="feedback")
    def action_reload(self) -> None:
        self.post_message(HeldLoaded(self.sources.server().held_feedback()))

    def on_held_loaded(self, m: HeldLoaded) -> None:
        table = self.query_one(DataTable)
        row = table.cursor_row
        table.clear()
        for item in m.items:
            table.add_row(str(item["id"]), item.get("key_id") or "-", _one_line(item.get("question"), 30),
                          _one_line(item.get("corrected"), 30), key=str(item["id"]))
        if m.items:
            table.move_cursor(row=min(row, len(m.items) - 1))

    def selected(self) -> int | None:
        table = self.query_one(DataTable)
        if table.row_count == 0:
            return None
        return int(str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value))

    def action_decide(self, accept: bool) -> None:
        feedback_id = self.selected()
        if feedback_id is None:
            self.notify("No correction waits for a decision.", markup=False)
            return
        self.decide(feedback_id, accept)

    @work(thread=True, exclusive=True, exit_on_error=False, group="feedback-write")
    def decide(self, feedback_id: int, accept: bool) -> None:
        self.sources.server().decide_feedback(feedback_id, accept)
        what = "Accepted: the next training run uses it." if accept else "Rejected: it is never trained on."
        self.app.call_from_thread(self.notify, f"Correction {feedback_id}: {what}", markup=False)
        self.action_reload()
