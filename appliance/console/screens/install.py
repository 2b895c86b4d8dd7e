"""Install: pick a bundle (USB mounts first) → verify, a progress bar per file → the machine and every
tier with its verdict and reasons → key file or passphrase → confirm → install steps → result.

All of it runs installer code in workers; the installer's questions (vendor key fingerprint,
"Install …?") arrive as dialogs through a `confirm` that blocks only the worker thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Button, ContentSwitcher, DataTable, Footer, Input, Label, ProgressBar, Static
from textual.worker import get_current_worker

from appliance.console.screens.base import ConsoleScreen
from appliance.console.widgets.dialogs import ConfirmDialog
from appliance.console.widgets.errors import error_text
from appliance.console.widgets.inputs import TextInput
from appliance.console.widgets.literal import text
from appliance.console.widgets.nav import NavBar
from appliance.errors import UsageError


@dataclass
class BundlesFound(Message):
    candidates: list[Any]


@dataclass
class FileProgress(Message):
    path: str
    fraction: float


@dataclass
class Checked(Message):
    checked: Any
    key_file: Path | None


@dataclass
class Step(Message):
    event: Any  # installer.steps.framework.StepEvent


@dataclass
class Finished(Message):
    summary: str
    error: BaseException | None


def _display(path: Path) -> str:
    """Shorter inside the working directory (and the same in every checkout, for snapshots)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class ProgressRow(Horizontal):
    def __init__(self, name: str) -> None:
        super().__init__(classes="step-row")
        self.label = Label(text(name[-13:]))
        self.bar = ProgressBar(total=1.0, show_eta=False)
        self.note = Label("")

    def compose(self) -> ComposeResult:
        yield self.label
        yield self.bar
        yield self.note


class InstallScreen(ConsoleScreen):
    NAV = "install"
    BINDINGS = [Binding("ctrl+r", "rescan", "Rescan")]  # Escape: the app's Back, which asks can_step_back()

    def __init__(self) -> None:
        super().__init__()
        self.bundle: Path | None = None
        self.checked: Any = None
        self.rows: dict[str, ProgressRow] = {}
        self.running = False

    def compose(self) -> ComposeResult:
        yield NavBar(self.NAV)
        with ContentSwitcher(initial="pick", id="install-body"):
            with Vertical(id="pick"):
                yield Static(Text("Choose the bundle (USB sticks first), or type its directory and press Enter."), classes="hint")
                yield DataTable(id="bundles", cursor_type="row")
                yield TextInput(placeholder="/media/usb/appliance-bundle", id="bundle-path")
            with Vertical(id="verify"):
                yield Static(id="verify-title", classes="hint")
                yield VerticalScroll(id="files")
            with Vertical(id="plan"):
                yield Static(id="machine", classes="hint")
                yield DataTable(id="tiers", cursor_type="row")
                yield TextInput(placeholder="model key file (model.key, from the second stick)", id="key-file")
                yield TextInput(placeholder="…or the passphrase", password=True, id="passphrase")
                yield Button("Install", variant="success", id="go")
            with Vertical(id="run"):
                yield VerticalScroll(id="steps")
                yield Static(id="install-result")
        yield Footer()

    def on_mount(self) -> None:
        bundles = self.query_one("#bundles", DataTable)
        bundles.add_column("bundle", width=66)
        bundles.add_column("where", width=5)
        table = self.query_one("#tiers", DataTable)
        for label, width in [(' ', 1), ('tier', 12), ('verdict', 12), ('backend', 12), ('reasons', 80)]:
            table.add_column(label, width=width, key=label.strip() or "mark")  # fixed widths: auto ones lag a refill
        self.action_rescan()

    # -- pick ---------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, exit_on_error=False, group="scan")
    def action_rescan(self) -> None:
        from appliance.console.sources.install import find_bundles

        roots = self.sources.bundle_roots
        found = find_bundles(roots, ()) if roots else find_bundles()
        self.post_message(BundlesFound(found))

    def on_bundles_found(self, m: BundlesFound) -> None:
        table = self.query_one("#bundles", DataTable)
        table.clear()
        for c in m.candidates:
            table.add_row(text(_display(c.path)), "USB" if c.usb else "local", key=str(c.path))
        if not m.candidates:
            self.query_one("#bundle-path", Input).focus()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == "bundles":
            self.start_check(Path(str(event.row_key.value)))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "bundle-path" and event.value.strip():
            self.start_check(Path(event.value.strip()).expanduser())
        elif event.input.id in ("key-file", "passphrase"):
            self.query_one("#go", Button).press()

    def show_step(self, step: str) -> None:
        self.query_one(ContentSwitcher).current = step
        focused = self.focused
        if focused is not None and step not in {node.id for node in focused.ancestors}:
            self.set_focus(None)  # not to a hidden input of another step, where keys would go unseen
        self.refresh_bindings()  # whether Escape goes back a step or a screen

    def can_step_back(self) -> bool:
        return not self.running and self.query_one(ContentSwitcher).current != "pick"

    def step_back(self) -> None:
        self.show_step("pick")
        bundles = self.query_one("#bundles", DataTable)
        if bundles.row_count:
            bundles.focus()

    # -- verify -------------------------------------------------------------------------------
    def confirm(self, question: str) -> bool:
        """For installer code in a worker thread: ask with a dialog, wait for the answer."""
        answered, box = threading.Event(), [False]

        def done(value: bool | None) -> None:
            box[0] = bool(value)
            answered.set()

        self.app.call_from_thread(self.app.push_screen, ConfirmDialog(question), done)
        worker = get_current_worker()
        while not answered.wait(0.2):
            if worker.is_cancelled:  # the console is closing: a blocked thread would hold up its exit
                raise UsageError("The console closed before the question was answered; nothing more was done.")
        return box[0]

    def start_check(self, bundle: Path) -> None:
        from appliance.console.sources.install import is_bundle

        if not is_bundle(bundle):
            self.notify(f"{bundle} is not a bundle directory (it has no manifest.json and manifest.sig).", severity="error", markup=False)
            return
        self.bundle = bundle
        self.query_one("#files", VerticalScroll).remove_children()
        self.rows.clear()
        self.query_one("#verify-title", Static).update(text(f"Verifying {bundle}: signature, then every file's size and SHA-256"))
        self.show_step("verify")
        self.check(bundle)

    @work(thread=True, exclusive=True, exit_on_error=False, group="install")
    def check(self, bundle: Path) -> None:
        from appliance.console.sources.install import check_bundle, find_key_file

        last: dict[str, float] = {}

        def on_file(path: str, done: int, size: int) -> None:
            f = done / size if size else 1.0
            if f >= 1.0 or f - last.get(path, -1.0) >= 0.02:  # no more than ~50 messages per file
                last[path] = f
                self.post_message(FileProgress(path, f))

        s = self.sources
        checked = check_bundle(s.layout, bundle, s.machine, self.confirm, on_file)
        self.post_message(Checked(checked, find_key_file(bundle, s.bundle_roots)))

    def on_file_progress(self, m: FileProgress) -> None:
        row = self.rows.get(m.path)
        if row is None:
            row = self.rows[m.path] = ProgressRow(m.path)
            scroll = self.query_one("#files", VerticalScroll)
            scroll.mount(row)
            scroll.scroll_end(animate=False)
        row.bar.update(progress=m.fraction)

    # -- plan ---------------------------------------------------------------------------------
    def on_checked(self, m: Checked) -> None:
        c = self.checked = m.checked
        p, man = c.plan, c.manifest
        machine = Text()
        machine.append_text(text(f"{man.name} {man.version} (sequence {man.sequence}) verified, signed by {c.fingerprint}\n"))
        machine.append_text(text(f"{p.machine.summary()}; {p.machine.cpu.physical_cores} cores; RAM {p.machine.ram_mib / 1024:.1f} GiB\n", "dim"))
        machine.append_text(text(p.reason if p.chosen else f"No tier fits: {p.reason}", "bold" if p.chosen else "bold red"))
        self.query_one("#machine", Static).update(machine)
        table = self.query_one("#tiers", DataTable)
        table.clear()
        style = {"runnable": "green", "low-memory": "yellow", "incompatible": "red"}
        for t, v in zip(p.tiers, p.verdicts, strict=True):
            table.add_row("*" if p.chosen is t else " ", text(t.name), Text(v.verdict, style=style.get(v.verdict, "")),
                          text(t.backend), text("; ".join(v.reasons)), key=t.name)
        if p.chosen is not None:
            table.move_cursor(row=list(p.tiers).index(p.chosen))
        if m.key_file:
            self.query_one("#key-file", Input).value = str(m.key_file)
        self.show_step("plan")
        self.query_one("#key-file", Input).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id != "go" or self.checked is None or self.running:
            return
        table = self.query_one("#tiers", DataTable)
        tier = str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value) if table.row_count else None
        key = self.query_one("#key-file", Input).value.strip()
        passphrase = self.query_one("#passphrase", Input).value
        if not key and not passphrase:
            self.notify("Give the model key file or the passphrase that came with the bundle.", severity="error", markup=False)
            return
        self.query_one("#steps", VerticalScroll).remove_children()
        self.rows.clear()
        self.query_one("#install-result", Static).update("")
        self.running = True
        self.show_step("run")
        self.run_install(tier if tier != (self.checked.plan.chosen.name if self.checked.plan.chosen else None) else None,
                         Path(key).expanduser() if key else None, passphrase or None)

    # -- install ------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, exit_on_error=False, group="install")
    def run_install(self, tier: str | None, key_file: Path | None, passphrase: str | None) -> None:
        from appliance.console.sources.install import run_install

        s = self.sources
        assert self.bundle is not None

        def emit(event: Any) -> None:
            self.post_message(Step(event))

        try:
            ctx = run_install(s.layout, s.runner, s.systemd, self.bundle, tier=tier, key_file=key_file, passphrase=passphrase,
                              fingerprint=self.checked.fingerprint, machine=s.machine,
                              emit=emit, confirm=self.confirm)
        except Exception as e:  # shown on the screen as the result, and as a notification
            self.post_message(Finished("", e))
            return
        info = None if ctx.verified is None or ctx.verified.current else ctx.plan
        summary = (f"Installed {info.name} {info.version} (sequence {info.sequence}), tier {info.tier}, "
                   f"under {s.layout.root}." if info else "Nothing to do: this bundle is already installed and current.")
        self.post_message(Finished("\n".join([summary, *ctx.notices]), None))

    def on_step(self, m: Step) -> None:
        e = m.event
        row = self.rows.get(e.step)
        if row is None:
            row = self.rows[e.step] = ProgressRow(e.step)
            self.query_one("#steps", VerticalScroll).mount(row)
        if e.status == "progress" and e.fraction is not None:
            row.bar.update(progress=e.fraction)
        elif e.status in ("done", "skipped"):
            row.bar.update(progress=1.0)
        mark = {"done": ("ok ", "green"), "skipped": ("skip ", "dim"), "failed": ("FAILED ", "bold red")}.get(e.status, ("", ""))
        row.note.update(Text(mark[0], style=mark[1]).append_text(text(e.message[:200])))

    def on_finished(self, m: Finished) -> None:
        self.running = False
        self.refresh_bindings()
        out = self.query_one("#install-result", Static)
        if m.error is None:
            out.update(Text(m.summary, style="bold green"))
            self.notify(f"Install finished. The Dashboard ({self.app.digit('dashboard')}) shows the server.", markup=False)  # type: ignore[attr-defined]
        else:
            out.update(error_text(m.error, "Install failed: "))
            self.app.show_error(m.error)  # type: ignore[attr-defined]
