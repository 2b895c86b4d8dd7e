"""Keys: list, create (the key is shown once), revoke. The same appliance.apikeys functions as
`appliance keys create|list|revoke`."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable, Footer, Static

from appliance.console.screens.base import ConsoleScreen
from appliance.console.widgets.dialogs import ConfirmDialog, SecretDialog
from appliance.console.widgets.nav import NavBar


@dataclass
class KeysLoaded(Message):
    keys: list  # list[apikeys.KeyRecord]


@dataclass
class KeyCreated(Message):
    key_id: str
    role: str
    key: str


class KeysScreen(ConsoleScreen):
    NAV = "keys"
    BINDINGS = [Binding("u", "create('user')", "New user key"), Binding("a", "create('admin')", "New admin key"),
                Binding("r", "revoke", "Revoke"), Binding("ctrl+r", "reload", "Reload")]

    def compose(self) -> ComposeResult:
        yield NavBar(self.NAV)
        yield Static(Text("API keys. Only hashes are stored: a key is shown once, when it is made."), classes="hint")
        yield DataTable(id="keys", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for label, width in [('id', 8), ('role', 5), ('created', 19), ('state', 27)]:
            table.add_column(label, width=width)  # fixed: auto widths lag behind a clear() and refill
        # the first ScreenResume (right after mount) loads the data

    def on_screen_resume(self) -> None:
        self.action_reload()

    @work(thread=True, exclusive=True, exit_on_error=False, group="keys")
    def action_reload(self) -> None:
        from appliance.apikeys import list_keys

        self.post_message(KeysLoaded(list_keys(self.sources.layout)))

    def on_keys_loaded(self, m: KeysLoaded) -> None:
        table = self.query_one(DataTable)
        row = table.cursor_row
        table.clear()
        for r in m.keys:
            state = Text("active", style="green") if r.active else Text(f"revoked {r.revoked_at[:19].replace('T', ' ')}", style="dim")
            table.add_row(r.id, r.role, r.created_at[:19].replace("T", " "), state, key=r.id)
        if m.keys:
            table.move_cursor(row=min(row, len(m.keys) - 1))

    @work(thread=True, exclusive=True, exit_on_error=False, group="keys-write")
    def action_create(self, role: str) -> None:
        from appliance.apikeys import create

        key_id, key = create(self.sources.layout, role)
        self.post_message(KeyCreated(key_id, role, key))

    def on_key_created(self, m: KeyCreated) -> None:
        self.app.push_screen(SecretDialog(f"New {m.role} key {m.key_id}:", m.key))
        self.action_reload()

    def selected(self) -> str | None:
        table = self.query_one(DataTable)
        if table.row_count == 0:
            return None
        return str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

    def action_revoke(self) -> None:
        key_id = self.selected()
        if key_id is None:
            self.notify("There is no key to revoke.", markup=False)
            return

        def done(yes: bool | None) -> None:
            if yes:
                self.revoke(key_id)

        self.app.push_screen(ConfirmDialog(f"Revoke key {key_id}? Clients using it get 401 from now on.", "Revoke"), done)

    @work(thread=True, exclusive=True, exit_on_error=False, group="keys-write")
    def revoke(self, key_id: str) -> None:
        from appliance.apikeys import revoke

        revoke(self.sources.layout, key_id)
        self.app.call_from_thread(self.notify, f"Revoked key {key_id}.", markup=False)
        self.action_reload()
