"""Console start-up and idle cost: cold start (new interpreter) to the first painted dashboard with data,
and the console's CPU use while it refreshes once a second.

The console runs as `appliance console --root R` would (Sources.real: real runner, psutil/NVML, HTTP)
on the recorded installation of tests/fixtures/console, against a small HTTP server in this process
that answers /health/ready and /metrics from the recorded scrapes. Textual renders headless.
Targets (issue 7): startup_s <= 1.0, idle_cpu_pct <= 3. Last line: `startup_s=<x> idle_cpu_pct=<y>`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "tests" / "fixtures" / "console"


def child(root: str, idle_s: float) -> None:
    sys.path.insert(0, str(REPO))
    from appliance.console.app import ConsoleApp
    from appliance.console.sources.context import Sources

    sources = Sources.real(root)

    class Bench(ConsoleApp):
        def on_mount(self) -> None:
            super().on_mount()
            self.watch_timer = self.set_interval(0.01, self.check)

        def check(self) -> None:
            s = self.screen
            if getattr(s, "loaded", False) and not getattr(self, "said_painted", False):
                self.said_painted = True  # figures (server, host) are in the widgets: report after that frame
                self.call_after_refresh(print, "painted", flush=True)
            if getattr(s, "complete", False):  # release, tier, model, adapter and units too
                self.watch_timer.stop()
                self.call_after_refresh(self.painted)

        def painted(self) -> None:
            print("complete", flush=True)
            self.set_timer(2.0, self.measure)  # let start-up work settle first

        def measure(self) -> None:
            self.t0, self.c0 = time.monotonic(), sum(os.times()[:4])
            self.set_timer(idle_s, self.done)

        def done(self) -> None:
            cpu = sum(os.times()[:4]) - self.c0
            wall = time.monotonic() - self.t0
            print(f"idle {cpu / wall * 100:.2f}", flush=True)
            self.exit()

    Bench(sources).run(headless=True, size=(80, 24))


def hello() -> None:
    """The baseline: the smallest Textual app, to its first painted frame."""
    from textual.app import App
    from textual.widgets import Static

    class Hello(App[None]):
        def compose(self):  # type: ignore[no-untyped-def]
            yield Static("hello")

        def on_mount(self) -> None:
            self.call_after_refresh(self.done)

        def done(self) -> None:
            print("painted", flush=True)
            self.exit()

    Hello().run(headless=True, size=(80, 24))


def cold(argv: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Spawn a child; the time from spawn to each marker line it prints (`idle` lines carry their own value)."""
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, __file__, *argv], stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
    assert p.stdout is not None
    out: dict[str, float] = {}
    for line in p.stdout:
        word, *rest = line.split()
        out[word] = float(rest[0]) if rest else time.monotonic() - t0
    p.wait(timeout=60)
    return out


def recorded_answer(path: str, _auth: str | None) -> tuple[int, bytes]:
    """The server as the fixtures recorded it: a busy /metrics scrape and a ready /health."""
    name = {"/metrics": "metrics-2.txt", "/health/ready": "health.json"}.get(path)
    return 200, (FIX / name).read_bytes() if name else b"{}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3, help="cold starts to take the median of")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of refreshing to measure CPU over")
    ap.add_argument("--child", metavar="ROOT", help=argparse.SUPPRESS)
    ap.add_argument("--hello", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hello:
        hello()
        return 0
    if args.child:
        child(args.child, args.idle)
        return 0
    sys.path.insert(0, str(REPO))
    from appliance.console.sources.recorded import build_root
    from tests.recorded_http import http_answers

    with http_answers(recorded_answer) as url:
        layout = build_root(FIX, Path(tempfile.mkdtemp(prefix="console-bench-")) / "root")
        layout.config_file.write_text(layout.config_file.read_text().replace("port = 8088", f"port = {url.rsplit(':', 1)[1]}"))
        starts, completes, idles, hellos = [], [], [], []
        env = {**os.environ, "APPLIANCE_API_KEY": "bench"}
        for i in range(args.runs):
            hellos.append(cold(["--hello"])["painted"])
            r = cold(["--child", str(layout.root), "--idle", str(args.idle)], env)
            starts.append(r["painted"])
            completes.append(r["complete"])
            idles.append(r["idle"])
            print(f"run {i + 1}: bare Textual app {hellos[-1]:.3f} s; console: first painted dashboard {starts[-1]:.3f} s, "
                  f"with units and release {completes[-1]:.3f} s, idle CPU {idles[-1]:.2f} % over {args.idle:.0f} s")
        s, f, c, h = (sorted(v)[len(v) // 2] for v in (starts, completes, idles, hellos))
        print(f"{'':<28}{'median':>10}{'target':>10}{'ratio':>8}")
        print(f"{'cold start to dashboard (s)':<28}{s:>10.3f}{1.0:>10.1f}{s / 1.0:>8.2f}")
        print(f"{'... with units, release (s)':<28}{f:>10.3f}{'':>10}{'':>8}")
        print(f"{'bare Textual app (s)':<28}{h:>10.3f}{'':>10}{'':>8}")
        print(f"{'console / bare Textual':<28}{s / h:>10.2f}")
        print(f"{'idle CPU while refreshing %':<28}{c:>10.2f}{3.0:>10.1f}{c / 3.0:>8.2f}")
    print(f"startup_s={s:.3f} idle_cpu_pct={c:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
