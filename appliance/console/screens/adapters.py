"""Adapters: the registry with metrics and lineage; promote and roll back after a confirmation.

appliance.adapters does the switch (the same code as `appliance adapters promote|rollback`); the
server notices the new link by itself, and is also asked to reload so the change shows at once.
"""

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
from appliance.console.widgets.dialogs import ConfirmDialog
from appliance.console.widgets.errors import error_parts
from appliance.console.widgets.literal import text
from appliance.console.widgets.nav import NavBar


@dataclass
class AdaptersLoaded(Message):
    adapters: list[Any]  # appliance.adapters.Adapter, oldest first
    active: str | None


def _metric(meta: dict[str, Any], *names: str) -> str:
    metrics: dict[str, Any] = meta["metrics"] if isinstance(meta.get("metrics"), dict) else {}  # the trainer's evaluate stage
    for n in names:
        v = metrics.get(n)
        if isinstance(v, int | float) and not isinstance(v, bool):
            return f"{v:.4f}"
    return "–"


class AdaptersScreen(ConsoleScreen):
    NAV = "adapters"
    BINDINGS = [Binding("p", "promote", "Promote"), Binding("b", "rollback", "Roll back"), Binding("ctrl+r", "reload", "Reload")]

    def compose(self) -> ComposeResult:
        yield NavBar(self.NAV)
        yield Static(id="active-line", classes="hint")
        yield DataTable(id="adapters", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        # Ids start with their UTC creation time (the trainer's run id), so no separate date column.
        for label, width in [(' ', 1), ('id', 23), ('val loss', 8), ('examples', 8), ('parent', 23)]:
            table.add_column(label, width=width)  # fixed: auto widths lag behind a clear() and refill
        # the first ScreenResume (right after mount) loads the data

    def on_screen_resume(self) -> None:
        self.action_reload()

    @work(thread=True, exclusive=True, exit_on_error=False, group="adapters")
    def action_reload(self) -> None:
        from appliance.adapters import active_id, list_adapters

        layout = self.sources.layout
        self.post_message(AdaptersLoaded(list_adapters(layout), active_id(layout)))

    def on_adapters_loaded(self, m: AdaptersLoaded) -> None:
        line = Text("active: ", style="dim").append_text(text(m.active or "none (the base model)", "bold"))
        self.query_one("#active-line", Static).update(line)
        table = self.query_one(DataTable)
        table.clear()
        for a in reversed(m.adapters):  # newest first
            meta = a.metadata
            counts = meta.get("counts") if isinstance(meta.get("counts"), dict) else {}
            mark = Text("●", style="bold green") if a.id == m.active else Text(" ")
            table.add_row(mark, text(a.id), _metric(meta, "candidate"),
                          str(counts.get("train", "–")), text(str(meta.get("parent") or "base")), key=a.id)

    def selected(self) -> str | None:
        table = self.query_one(DataTable)
        if table.row_count == 0:
            return None
        return str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

    def action_promote(self) -> None:
        adapter_id = self.selected()
        if adapter_id is None:
            self.notify("There is no adapter to promote yet: train one first.", markup=False)
            return
        def answered(yes: bool | None) -> None:
            if yes:
                self.change("promote", adapter_id)

        self.app.push_screen(ConfirmDialog(f"Promote adapter {adapter_id}? The server switches to it between batches.", "Promote"), answered)

    def action_rollback(self) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self.change("rollback", None)

        self.app.push_screen(ConfirmDialog("Roll back to the adapter that was active before this one?", "Roll back"), answered)

    @work(thread=True, exclusive=True, exit_on_error=False, group="adapters-write")
    def change(self, what: str, adapter_id: str | None) -> None:
        from appliance import adapters

        layout = self.sources.layout
        if what == "promote":
            assert adapter_id is not None
            done = f"Promoted {adapters.promote(layout, adapter_id).id}."
        else:
            back = adapters.rollback(layout)
            done = f"Rolled back to {back.id if back else 'the base model'}."
        self.action_reload()
        try:
            self.sources.server().reload_adapter()
            done += " The server has loaded it."
        except Exception as e:  # the server also notices the link by itself within a second
            done += f" The server was not told ({error_parts(e)[0]}); it picks the change up by itself."
        self.app.call_from_thread(self.notify, done, markup=False)
