"""Dashboard: release, tier, model, adapter; units; server figures from /metrics; CPU, RAM and GPUs.

Two polls in workers: a fast one each second (health, /metrics, host) and a slow one every five
seconds (`appliance status`, which runs systemctl). Neither runs while another screen is shown.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Footer, Static

from appliance.console.screens.base import ConsoleScreen
from appliance.console.sources.host import HostSample
from appliance.console.sources.overview import Overview
from appliance.console.sources.prom import Samples, ServerStats, gpus, parse, stats
from appliance.console.sources.server import Health
from appliance.console.sources.training import RunRow
from appliance.console.widgets.errors import error_line, error_parts
from appliance.console.widgets.literal import text
from appliance.console.widgets.nav import NavBar
from appliance.errors import ApplianceError

WINDOW = 11  # scrapes kept: rates and quantiles over the last ~10 seconds
SLOW_EVERY = 5
STATE_STYLE = {"active": "green", "ready": "green", "failed": "bold red", "start-limit-hit": "bold red", "down": "bold red",
               "activating": "yellow", "loading": "yellow", "inactive": "dim", "not installed": "dim"}


@dataclass
class Sampled(Message):
    health: Health
    metrics: Samples | None
    metrics_error: str | None
    at: float
    host: HostSample


@dataclass
class OverviewLoaded(Message):
    overview: Overview
    last_run: RunRow | None


def _fmt(v: float | None, unit: str = "", digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}{unit}"


def _short_time(detail: str) -> str:
    """`next Mon 2026-11-23 03:00:00 UTC` -> `next 2026-11-23 03:00`: it has to fit half of 80 columns."""
    m = re.search(r"(\d{4}-\d\d-\d\d \d\d:\d\d)", detail)
    return detail if m is None else f"{detail.split(' ', 1)[0]} {m.group(1)}"


def _gib(mib: float | None) -> str:
    return "?" if mib is None else f"{mib / 1024:.1f}"


class DashboardScreen(ConsoleScreen):
    NAV = "dashboard"
    BINDINGS = [Binding("s", "start_server", "Start/restart server")]

    def __init__(self) -> None:
        super().__init__()
        self.scrapes: deque[tuple[float, Samples]] = deque(maxlen=WINDOW)
        self.ticks = 0
        self.loaded = False
        self.overview_due = False
        self.complete = False  # the overview (release, units) has been painted too

    def compose(self) -> ComposeResult:
        yield NavBar(self.NAV)
        yield Static("reading the installation…", id="summary")
        with Horizontal(id="dash-row"):
            yield Static(id="units", classes="panel")
            yield Static(id="server", classes="panel")
        yield Static(id="host", classes="panel")
        yield Static(id="last-run", classes="panel")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#units").border_title = "Units"
        self.query_one("#server").border_title = "Server"
        self.query_one("#host").border_title = "Host"
        self.query_one("#last-run").border_title = "Last training run"
        self.timer = self.set_interval(self.sources.refresh_s, self.tick)
        self.tick()

    def on_screen_suspend(self) -> None:
        self.timer.pause()

    def on_screen_resume(self) -> None:
        self.timer.resume()
        self.overview_due = True  # a fresh overview when coming back
        self.tick()

    def tick(self) -> None:
        # The fast poll first: the figures people watch appear before systemctl has answered.
        if not self.busy("fast"):
            self.poll_fast()
        if self.ticks % SLOW_EVERY == 0 and self.ticks and not self.busy("slow"):
            self.poll_overview()
        self.ticks += 1

    @work(thread=True, exclusive=True, exit_on_error=False, group="slow")
    def poll_overview(self) -> None:
        from appliance.console.sources.overview import overview
        from appliance.console.sources.training import last_run

        s = self.sources
        try:
            o = overview(s.layout, s.runner, s.systemd)
        except ApplianceError as e:  # e.g. a damaged state.json: shown in place, not as a notification every 5 s
            o = Overview(None, None, None, None, None, (), error_line(e))
        self.post_message(OverviewLoaded(o, last_run(s.layout)))

    @work(thread=True, exclusive=True, exit_on_error=False, group="fast")
    def poll_fast(self) -> None:
        s = self.sources
        server = s.server()
        health = server.health()
        metrics, error = None, None
        if health.status != "down":
            try:
                metrics = parse(server.metrics())
            except Exception as e:  # shown in the panel, not as a notification every second
                error = error_parts(e)[0]
        self.post_message(Sampled(health, metrics, error, s.clock(), s.sample_host()))

    def action_start_server(self) -> None:
        from appliance.console.widgets.dialogs import ConfirmDialog

        def answered(yes: bool | None) -> None:
            if yes:
                self.start_server()

        how = "systemctl restart appliance-server" if self.sources.systemd else "appliance serve in the background"
        self.app.push_screen(ConfirmDialog(f"Start (or restart) the server ({how})? Requests in flight are cut off.", "Start"), answered)

    @work(thread=True, exclusive=True, exit_on_error=False, group="start")
    def start_server(self) -> None:
        msg = self.sources.server_starter().start()
        self.app.call_from_thread(self.notify, msg, markup=False)

    def on_overview_loaded(self, m: OverviewLoaded) -> None:
        o = m.overview
        t = Text(no_wrap=True, overflow="ellipsis")
        pairs = (("release", o.release or "none installed"), ("tier", o.tier or "–"),
                 ("model", f"{o.model} ({o.backend})" if o.model else "–"), ("adapter", o.adapter or "base model"))
        for i, (k, v) in enumerate(pairs):
            t.append(("  " if i else "") + k + " ", style="dim")
            t.append_text(text(v, "bold"))
        if o.problem:
            t.append("\n").append_text(text(o.problem, "bold red"))
        self.query_one("#summary", Static).update(t)
        table = Table.grid(padding=(0, 1))
        table.add_column(no_wrap=True)
        table.add_column()
        for u in o.units:  # named as systemctl and journalctl take them
            table.add_row(text(u.name), text(u.state, STATE_STYLE.get(u.state.split(" ")[0], "")))
            if u.detail:
                table.add_row(text("  " + _short_time(u.detail), "dim"), Text(""))
        self.query_one("#units", Static).update(table)
        self.query_one("#last-run", Static).update(self._run_panel(m.last_run))
        self.complete = True
        self.flush_notes()

    def on_sampled(self, m: Sampled) -> None:
        if not self.loaded or self.overview_due:
            # The first overview starts once the first figures are painted, not competing with them for the GIL.
            self.overview_due = False
            self.poll_overview()
        self.loaded = True
        self.query_one("#server", Static).update(self._server_panel(m))
        self.query_one("#host", Static).update(self._host_panel(m.host))
        self.flush_notes()

    def _server_panel(self, m: Sampled) -> Text:
        h = m.health
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append_text(text(h.status, STATE_STYLE.get(h.status, "yellow")))
        t.append_text(text(f"  {self.sources.server().base_url}", "dim"))
        if h.status == "down":
            t.append("\n").append_text(text(h.detail, "dim"))
            self.scrapes.clear()
            return t
        if m.metrics is None:
            t.append("\n").append_text(text(m.metrics_error or "no metrics", "yellow"))
            return t
        self.scrapes.append((m.at, m.metrics))
        (t0, old), (t1, new) = self.scrapes[0], self.scrapes[-1]
        s: ServerStats = stats(new, old if t1 > t0 else None, t1 - t0)
        t.append(f"\nreq/s {_fmt(s.requests_per_s, digits=2):>7}   tok/s {_fmt(s.tokens_per_s):>7}")
        t.append(f"\np50 {_fmt(s.p50_s, ' s', 2):>9}   p99 {_fmt(s.p99_s, ' s', 2):>9}")
        t.append(f"\nqueue {_fmt(s.queue_depth, digits=0):>7}   decoding {_fmt(s.active, digits=0):>4}")
        for g in gpus(new):  # the server's own GPUs, through its NVML gauges
            t.append(f"\nGPU{g.gpu} {_fmt(g.util_pct, ' %', 0):>5}   mem {_gib(g.used_mib)} / {_gib(g.total_mib)} GiB")
        return t

    def _run_panel(self, r: RunRow | None) -> Text:
        if r is None:
            key = self.app.digit("training")  # type: ignore[attr-defined]
            return Text(f"none yet; the trainer timer runs nightly, or press {key} then t to train now", style="dim")
        style = {"promoted": "green", "kept": "yellow", "failed": "bold red", "running": "cyan"}.get(r.status, "")
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append_text(text(r.date or r.id)).append("  ").append_text(text(r.status or "?", style))
        if r.candidate_loss is not None:
            t.append(f"  val loss {r.candidate_loss:.3f}")
        if r.examples is not None:
            t.append(f"  {r.examples} examples")
        t.append("\n").append_text(text(r.error or r.reason or "", "dim"))
        return t

    def _host_panel(self, h: HostSample) -> Table:
        table = Table.grid(padding=(0, 1))
        table.add_row(Text("CPU", style="bold"), Text(f"{h.cpu_pct:5.1f} %"),
                      Text(f"RAM {_gib(h.ram_used_mib)} / {_gib(h.ram_total_mib)} GiB"))
        for g in h.gpus:
            table.add_row(Text(f"GPU{g.index}", style="bold"), Text(f"{_fmt(g.util_pct, ' %'):>7}"),
                          text(f"mem {_gib(g.mem_used_mib)} / {_gib(g.mem_total_mib)} GiB  {_fmt(g.temp_c, ' °C', 0)}  {g.name}"))
        if h.note:
            table.add_row(Text(""), Text(""), text(h.note, "dim"))
        return table
