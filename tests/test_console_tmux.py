"""`appliance console` in a real terminal: tmux, read back with `capture-pane`: at 80x24, and the tour of
every screen by the key its nav bar shows, at 100x30."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from appliance.console.app import ConsoleApp
from appliance.console.sources.recorded import build_root
from appliance.paths import SERVER_UNIT, TIMER_UNIT, TRAINER_UNIT
from tests.waiting import wait_until

FIX = Path(__file__).parent / "fixtures" / "console"
REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Tmux:
    def __init__(self) -> None:
        self.sock = f"appliance-test-{uuid.uuid4().hex[:8]}"

    def __call__(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.sock, *args], capture_output=True, text=True, timeout=20).stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "console")

    def wait_for(self, needle: str, timeout: float = 30.0) -> str:
        try:
            return wait_until(lambda: self._showing(needle), f"{needle!r} on the screen", timeout, every=0.2)
        except AssertionError as e:
            raise AssertionError(f"{e}; the screen was:\n{self.screen()}") from None

    def _showing(self, needle: str) -> str:
        text = self.screen()
        return text if needle in text else ""

    def highlighted(self) -> str:
        """The nav bar's highlighted item (reverse video): the screen shown now."""
        return reverse_video(self("capture-pane", "-e", "-p", "-t", "console").splitlines()[0])

    def start(self, root: Path, size: tuple[int, int], cwd: Path) -> None:
        # The terminal tells its size: COLUMNS and LINES (pytest-xdist's workers set 80 and 24) would override it.
        env = {k: v for k, v in os.environ.items() if k not in ("APPLIANCE_API_KEY", "COLUMNS", "LINES")}
        env["PYTHONPATH"] = str(REPO)
        cmd = f"{sys.executable} -m appliance.cli console --root {root}; echo console exited $?; sleep 30"
        subprocess.run(["tmux", "-L", self.sock, "new-session", "-d", "-s", "console", "-x", str(size[0]), "-y", str(size[1]), cmd],
                       check=True, timeout=20, env=env, cwd=cwd)

    def keys(self, *keys: str) -> None:
        self("send-keys", "-t", "console", *keys)


def reverse_video(line: str) -> str:
    """The characters of a `capture-pane -e` line drawn in reverse video (SGR 7)."""
    out, rev = [], False
    for m in re.finditer(r"\x1b\[([\d;]*)m|([^\x1b]+)", line):
        if m.group(2) is not None:
            out.append(m.group(2) if rev else " ")
            continue
        params = [int(p or 0) for p in m.group(1).split(";")]
        i = 0
        while i < len(params):
            p = params[i]
            if p in (38, 48, 58):  # a colour: 5;n or 2;r;g;b follow
                i += 3 if i + 1 < len(params) and params[i + 1] == 5 else 5
                continue
            rev = True if p == 7 else False if p in (0, 27) else rev
            i += 1
    return " ".join("".join(out).split())


def port_config(root: Path) -> Path:
    layout = build_root(FIX, root)
    cfg = layout.config_file
    cfg.write_text(cfg.read_text().replace("port = 8088", f"port = {free_port()}"))  # nothing listens there
    return layout.root


def test_console_in_tmux_at_80x24(tmp_path: Path) -> None:
    root = port_config(tmp_path / "root")
    tmux = Tmux()
    try:
        tmux.start(root, (80, 24), REPO)
        text = tmux.wait_for("release 1.0.0")
        text = tmux.wait_for("down  http://127.0.0.1:")  # the server is down, and says so
        lines = text.splitlines()
        assert len(lines) <= 24 and all(len(ln) <= 80 for ln in lines)
        assert "Dashboard" in lines[0] and "Playground" in lines[0] and "Host" in text and "CPU" in text
        assert all(unit in text for unit in (SERVER_UNIT, TRAINER_UNIT, TIMER_UNIT))
        tmux.keys("5")
        text = tmux.wait_for("New user key")
        assert "3f9a0c21" in text and "revoked" in text
        tmux.keys("q")
        tmux.wait_for("console exited 0", 20)
    finally:
        tmux("kill-server")


# What each screen shows once it is there (a screen without an entry is checked by the nav bar alone).
SHOWS = {"dashboard": SERVER_UNIT, "install": "Choose the bundle", "training": "candidate", "adapters": "val loss",
         "keys": "New user key", "logs": "Follow", "playground": "ask the model"}


def test_tour_of_every_screen_by_the_key_it_shows_in_tmux_at_100x30(tmp_path: Path) -> None:
    """Start on the dashboard, press each screen's key from the screen before, as the nav bar shows it;
    through Install with its path input focused, and the Playground's prompt; then quit with q."""
    root = port_config(tmp_path / "root")
    (tmp_path / "cwd").mkdir()  # no bundle here: Install puts the focus in its path input
    pages = ConsoleApp.PAGES
    tmux = Tmux()

    def nav() -> dict[str, str]:
        return {label: key for key, label in re.findall(r"(F?\d) (\w+)", tmux.screen().splitlines()[0])}

    def nav_shows(label: str, key: str, why: str) -> None:
        wait_until(lambda: nav().get(label) == key, f"{key} {label} in the nav bar {why}", 30, 0.2)

    def footer_shows(hint: str, why: str) -> None:  # the footer redraws after the nav bar, in a frame of its own
        wait_until(lambda: hint in tmux.screen().splitlines()[-1], f"{hint!r} in the footer {why}", 30, 0.2)

    def arrive(n: int) -> str:
        page = pages[n - 1]
        wait_until(lambda: tmux.highlighted().endswith(f"{n} {page.label}"), f"{page.label} highlighted in the nav bar", 30, 0.2)
        return tmux.wait_for(SHOWS.get(page.mode, page.label))

    try:
        tmux.start(root, (100, 30), tmp_path / "cwd")
        arrive(1)
        for n in range(2, len(pages) + 1):
            here, there = pages[n - 2], pages[n - 1]
            if here.mode in ("install", "playground"):  # typing: digits are text, F-keys and Escape say so
                nav_shows(there.label, f"F{n}", f"while typing on {here.label}")
                footer_shows("esc Leave input", f"while typing on {here.label}")
                tmux.keys(f"{n}q")
                assert tmux.wait_for(f"{n}q").splitlines()[0] == tmux.screen().splitlines()[0]  # typed, still here
                assert tmux.highlighted().endswith(f"{n - 1} {here.label}")
            if here.mode == "playground":  # Escape leaves the prompt: the digits are keys again
                tmux.keys("Escape")
                nav_shows(there.label, str(n), "after Escape")
                footer_shows("esc Back", "after Escape")
            tmux.keys(nav()[there.label])  # the key the nav bar shows for it now
            arrive(n)
        tmux.keys("M-1")  # alt+1 (tmux sends ESC 1): the dashboard, from whatever the last screen is
        text = arrive(1)
        assert all(unit in text for unit in (SERVER_UNIT, TRAINER_UNIT, TIMER_UNIT))
        tmux.keys("2")
        arrive(2)
        nav_shows(pages[0].label, "F1", "in Install's input")
        tmux.keys("M-1")  # from inside the input too
        arrive(1)
        tmux.keys("q")
        tmux.wait_for("console exited 0", 20)  # the process ended, and ended well
    finally:
        tmux("kill-server")
