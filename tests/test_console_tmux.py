"""`appliance console` in a real terminal: tmux at 80x24, read back with `capture-pane`."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from appliance.console.sources.recorded import build_root

FIX = Path(__file__).parent / "fixtures" / "console"
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
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = self.screen()
            if needle in text:
                return text
            time.sleep(0.2)
        raise AssertionError(f"{needle!r} never appeared; the screen was:\n{self.screen()}")


def test_console_in_tmux_at_80x24(tmp_path: Path) -> None:
    layout = build_root(FIX, tmp_path / "root")
    cfg = layout.config_file
    cfg.write_text(cfg.read_text().replace("port = 8088", f"port = {free_port()}"))  # nothing listens there
    env = {k: v for k, v in os.environ.items() if k != "APPLIANCE_API_KEY"}
    cmd = f"{sys.executable} -m appliance.cli console --root {layout.root}; sleep 30"
    tmux = Tmux()
    try:
        subprocess.run(["tmux", "-L", tmux.sock, "new-session", "-d", "-s", "console", "-x", "80", "-y", "24", cmd],
                       check=True, timeout=20, env=env, cwd=Path(__file__).parent.parent)
        text = tmux.wait_for("release 1.0.0")
        text = tmux.wait_for("does not answer")  # the server is down, and says so
        lines = text.splitlines()
        assert len(lines) <= 24 and all(len(ln) <= 80 for ln in lines)
        assert "1 Dashboard" in lines[0] and "7 Playground" in lines[0]
        assert "trainer.timer" in text and "Host" in text and "CPU" in text
        tmux("send-keys", "-t", "console", "5")
        text = tmux.wait_for("New user key")
        assert "3f9a0c21" in text and "revoked" in text
        tmux("send-keys", "-t", "console", "q")
        end = time.monotonic() + 20
        while "New user key" in tmux.screen() and time.monotonic() < end:
            time.sleep(0.2)
        assert "New user key" not in tmux.screen()  # q quit the app
    finally:
        tmux("kill-server")
