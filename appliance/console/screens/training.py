"""Training: past runs from their reports (date, examples, masked PII, losses, gate decision), the
selected run's loss curve, and "train now" (the trainer unit, or `appliance train --now`)."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable, Footer, Static
from textual_plotext import PlotextPlot

from appliance.console.screens.base import ConsoleScreen
from appliance.console.sources.training import RunRow
from appliance.console.widgets.dialogs import ConfirmDialog
from appliance.console.widgets.literal import text
from appliance.console.widgets.nav import NavBar


@dataclass
class RunsLoaded(Message):
    runs: list[RunRow]


def _loss(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


class TrainingScreen(ConsoleScreen):
    NAV = "training"
    BINDINGS = [Binding("t", "train_now", "Train now"), Binding("ctrl+r", "reload", "Reload")]

    def __init__(self) -> None:
        super().__init__()
        self.runs: dict[str, RunRow] = {}

    def compose(self) -> ComposeResult:
        yield NavBar(self.NAV)
        yield DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        yield Static(id="gate", classes="hint")
        yield PlotextPlot(id="curve")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for label, width in [('date', 19), ('examples', 8), ('PII', 4), ('base', 6), ('active', 6), ('candidate', 9), ('gate', 8)]:
            table.add_column(label, width=width)  # fixed: auto widths lag behind a clear() and refill
        self.timer = self.set_interval(5.0, self.check_child)
        # the first ScreenResume (right after mount) loads the data

    def on_screen_suspend(self) -> None:
        self.timer.pause()

    def on_screen_resume(self) -> None:
        self.timer.resume()
        self.action_reload()

    @work(thread=True, exclusive=True, exit_on_error=False, group="runs")
    def action_reload(self) -> None:
        from appliance.console.sources.training import load_runs

        self.post_message(RunsLoaded(load_runs(self.sources.layout)))

    def on_runs_loaded(self, m: RunsLoaded) -> None:
        table = self.query_one(DataTable)
        table.clear()
        self.runs = {r.id: r for r in m.runs}
        for r in m.runs:
            style = {"promoted": "green", "kept": "yellow", "failed": "bold red", "unreadable": "red", "running": "cyan"}
            gate = text(r.status or "–", style.get(r.status, "dim"))
            table.add_row(text(r.date or r.id), "–" if r.examples is None else str(r.examples),
                          "–" if r.pii_masked is None else str(r.pii_masked),
                          _loss(r.base_loss), _loss(r.active_loss), _loss(r.candidate_loss), gate, key=r.id)
        if not m.runs:
            self.query_one("#gate", Static).update(Text("No training runs yet. Press t to train now.", style="dim"))
            self.show_curve(None)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        run = self.runs.get(str(event.row_key.value))
        if run is not None:
            self.query_one("#gate", Static).update(Text(f"{run.status or 'run'}: ", style="dim").append_text(text(run.error or run.reason or "–")))
            self.show_curve(run)

    def show_curve(self, run: RunRow | None) -> None:
        widget = self.query_one(PlotextPlot)
        plt = widget.plt
        plt.clear_data()
        plt.title("loss" if run is None else f"loss, run {run.id}")
        if run is not None and run.curve:
            plt.plot([p[0] for p in run.curve], [p[1] for p in run.curve], label="train", marker="braille")
        if run is not None and run.val_curve:
            plt.plot([p[0] for p in run.val_curve], [p[1] for p in run.val_curve], label="validation", marker="braille")
        plt.xlabel("step")
        widget.refresh()

    def action_train_now(self) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self.start_training()

        self.app.push_screen(ConfirmDialog("Start a training run now? It runs at low priority; the server keeps answering.", "Train"), answered)

    @work(thread=True, exclusive=True, exit_on_error=False, group="train")
    def start_training(self) -> None:
        msg = self.sources.trainer().start()
        self.app.call_from_thread(self.notify, msg, markup=False)

    def check_child(self) -> None:
        if self.sources._trainer is None:
            return
        done = self.sources.trainer().finished()
        if done is not None:
            rc, tail = done
            self.notify(f"The training run ended (exit {rc}): {tail}", markup=False, severity="information" if rc == 0 else "error")
            self.action_reload()
